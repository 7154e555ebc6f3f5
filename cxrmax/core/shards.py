"""Work split over machines: ``--shard i/N`` parsing and the deterministic partition of samples."""

from __future__ import annotations

import hashlib
import re

from cxrmax.core.errors import InputError


def parse_shard(shard: str | tuple[int, int] | None) -> tuple[int, int] | None:
    """Parse ``"i/N"`` (0 <= i < N, blanks allowed around the numbers) or an (i, N) tuple.

    None and "" mean "no sharding" and give None."""
    if shard is None or shard == "":
        return None
    if isinstance(shard, str):
        match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", shard)
        if not match:
            raise InputError(f"--shard {shard!r} is not of the form i/N (for example 0/4)")
        shard = (int(match.group(1)), int(match.group(2)))
    index, count = int(shard[0]), int(shard[1])
    if count < 1 or not 0 <= index < count:
        raise InputError(f"--shard {index}/{count}: need 0 <= i < N")
    return index, count


def shard_of(sample_id: str, count: int) -> int:
    """The shard (0..count-1) a sample belongs to: a hash of its id, so every machine agrees."""
    return int.from_bytes(hashlib.sha256(sample_id.encode("utf-8")).digest()[:8], "big") % count
