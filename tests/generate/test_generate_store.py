"""Exactly-once storage: request keys, journal recovery, atomic shards, the failure ledger; plus roster,
prompts, governance and rate limits (no server needed)."""

from __future__ import annotations

import asyncio
import json
import os
import time

import pyarrow as pa
import pytest

from cxrmax.core.errors import InputError
from cxrmax.core.schemas import TRAJECTORY_SCHEMA
from cxrmax.generate import read_trajectories
from cxrmax.generate.governance import ExternalEndpointError, check_endpoints, endpoint_is_local
from cxrmax.generate.prompts import load_prompt, parse_template, prompt_hash
from cxrmax.generate.ratelimit import TokenBucket
from cxrmax.generate.roster import load_roster, resolve_model
from cxrmax.generate.store import (
    FailureRecord,
    KeySet,
    StoreLockedError,
    TrajectoryStore,
    key_digest,
    read_shard,
    request_key,
    request_seed,
)

SAMPLING = {"temperature": 0.7, "top_p": 0.9, "max_tokens": 64, "seed": 0}


def _row(i: int, text: str = "answer") -> dict:
    key = request_key(f"s{i}", "m", "h", SAMPLING, 0)
    return {
        "request_key": key,
        "sample_id": f"s{i}",
        "model": "m",
        "sample_index": 0,
        "text": f"{text} {i}",
        "finish_reason": "stop",
        "labels": {"Edema": 1.0},
        "created_at": int(time.time() * 1000),
    }


def test_request_key_changes_with_every_component():
    base = request_key("s1", "qwen2-vl", "abc", SAMPLING, 0)
    assert base == request_key("s1", "qwen2-vl", "abc", dict(reversed(list(SAMPLING.items()))), 0)
    variants = [
        request_key("s2", "qwen2-vl", "abc", SAMPLING, 0),
        request_key("s1", "kimi-vl", "abc", SAMPLING, 0),
        request_key("s1", "qwen2-vl", "abd", SAMPLING, 0),
        request_key("s1", "qwen2-vl", "abc", {**SAMPLING, "temperature": 0.8}, 0),
        request_key("s1", "qwen2-vl", "abc", {**SAMPLING, "max_tokens": 65}, 0),
        request_key("s1", "qwen2-vl", "abc", {**SAMPLING, "seed": 1}, 0),
        request_key("s1", "qwen2-vl", "abc", SAMPLING, 1),
    ]
    assert len({base, *variants}) == 1 + len(variants)
    assert len(base) == 64 and int(base, 16) >= 0
    assert request_seed(0, "s1", 0) == request_seed(0, "s1", 0) != request_seed(0, "s1", 1)


def test_keyset_membership_including_trailing_zero_bytes():
    digests = [bytes([i] * 15) + b"\0" for i in range(1, 50)] + [b"\0" * 16, bytes(range(16))]
    keys = KeySet(digests)
    assert len(keys) == len(digests)
    for digest in digests:
        assert digest in keys
    assert bytes([1] * 16) not in keys
    assert b"\x05" * 15 + b"\x01" not in keys


def test_append_commit_and_reopen_sees_done_keys(tmp_path):
    with TrajectoryStore(tmp_path / "m", rows_per_shard=3) as store:
        for i in range(7):
            store.append(_row(i))
    shards = sorted((tmp_path / "m").glob("part-*.arrow"))
    assert [read_shard(p).num_rows for p in shards] == [3, 3, 1]
    assert not list((tmp_path / "m").glob("wal-*"))
    assert read_trajectories(tmp_path / "nothing-here").num_rows == 0
    with TrajectoryStore(tmp_path / "m") as store:
        assert len(store.done) == 7
        assert store.is_done(key_digest(_row(3)["request_key"]))
        assert not store.is_done(key_digest(request_key("s99", "m", "h", SAMPLING, 0)))
    table = pa.concat_tables(read_shard(p) for p in shards)
    assert table.schema == TRAJECTORY_SCHEMA
    assert table["labels"][0].as_py()["Edema"] == 1.0


def test_ordered_read_is_the_same_whatever_order_the_answers_were_committed_in(tmp_path):
    # Concurrent requests commit in completion order; resampling consumers must not see that order.
    for run, order in (("a", [4, 0, 3, 1, 2]), ("b", [2, 1, 0, 4, 3])):
        with TrajectoryStore(tmp_path / run / "trajectories" / "m", rows_per_shard=2) as store:
            for i in order:
                store.append(_row(i))
    committed = [read_trajectories(tmp_path / run).column("sample_id").to_pylist() for run in "ab"]
    assert committed[0] != committed[1]
    a, b = (read_trajectories(tmp_path / run, ordered=True) for run in "ab")
    assert a.column("sample_id").to_pylist() == [f"s{i}" for i in range(5)]
    assert a.select(["sample_id", "text"]).equals(b.select(["sample_id", "text"]))
    picked = read_trajectories(tmp_path / "a", model="m", columns=["sample_id", "text"], ordered=True)
    assert picked.column("text").to_pylist() == [f"answer {i}" for i in range(5)]


def test_killed_run_journal_is_recovered_and_torn_line_ignored(tmp_path):
    folder = tmp_path / "m"
    store = TrajectoryStore(folder, rows_per_shard=100).open()
    for i in range(5):
        store.append(_row(i))
    # Simulate kill -9: no close(); the last write was torn mid-line.
    journal = next(folder.glob("wal-*.jsonl"))
    with open(journal, "a") as handle:
        handle.write(json.dumps(_row(5))[:40])
    os.close(store._lock_fd)  # the kernel releases the lock of a killed process
    store._lock_fd = None
    with TrajectoryStore(folder) as again:
        assert again.recovered_rows == 5
        assert len(again.done) == 5
    assert not list(folder.glob("wal-*"))
    keys = pa.concat_tables(read_shard(p) for p in folder.glob("part-*.arrow"))["request_key"].to_pylist()
    assert sorted(keys) == sorted(_row(i)["request_key"] for i in range(5))


def test_journal_rows_that_no_longer_fit_the_schema_are_redone_not_fatal(tmp_path):
    """An older version journalled content parts as a list: recovery must not crash on every rerun."""
    folder = tmp_path / "m"
    store = TrajectoryStore(folder, rows_per_shard=100).open()
    store.append(_row(0))
    journal = next(folder.glob("wal-*.jsonl"))
    bad = _row(1) | {"text": [{"type": "text", "text": "parts"}]}
    with open(journal, "a") as handle:
        handle.write(json.dumps(bad) + "\n")
        handle.write(json.dumps(_row(2)) + "\n")
    os.close(store._lock_fd)
    store._lock_fd = None
    with pytest.warns(UserWarning, match="1 journal row"), TrajectoryStore(folder) as again:
        assert (again.recovered_rows, again.rejected_rows) == (2, 1)
        assert again.is_done(key_digest(_row(0)["request_key"]))
        assert not again.is_done(key_digest(bad["request_key"]))  # made again by the next run
    table = pa.concat_tables(read_shard(p) for p in folder.glob("part-*.arrow"))
    assert sorted(table["text"].to_pylist()) == ["answer 0", "answer 2"]


def test_journal_whose_shard_exists_is_not_counted_twice(tmp_path):
    folder = tmp_path / "m"
    store = TrajectoryStore(folder, rows_per_shard=100).open()
    for i in range(4):
        store.append(_row(i))
    journal = next(folder.glob("wal-*.jsonl"))
    saved = journal.read_text()
    store.close()  # commits the shard and deletes the journal
    journal.write_text(saved)  # as if killed between os.replace(shard) and unlink(journal)
    with TrajectoryStore(folder) as again:
        assert again.recovered_rows == 0
        assert len(again.done) == 4
    rows = sum(read_shard(p).num_rows for p in folder.glob("part-*.arrow"))
    assert rows == 4 and not journal.exists()


def test_second_writer_on_same_folder_is_refused(tmp_path):
    with TrajectoryStore(tmp_path / "m"):
        with pytest.raises(Exception, match="being written by pid"):
            TrajectoryStore(tmp_path / "m").open()
    # A different shard tag may write next to it.
    with TrajectoryStore(tmp_path / "m", shard=(0, 2)), TrajectoryStore(tmp_path / "m", shard=(1, 2)):
        pass


def test_writers_whose_requests_overlap_are_refused_whatever_their_shard_tags(tmp_path):
    """An unsharded run plans every request, so it must not write beside any --shard run (and --shard
    0/2 beside 0/3 overlap too): before, only writers of the same tag were kept apart, and an unsharded
    run next to a --shard 0/2 run asked (and stored) that shard's requests twice."""
    folder = tmp_path / "m"
    with TrajectoryStore(folder, shard=(0, 2)):
        with pytest.raises(
            StoreLockedError,
            match=r"pid \d+ \(--shard 0/2\), whose requests overlap this run's \(no --shard\)",
        ):
            TrajectoryStore(folder).open()
        with pytest.raises(StoreLockedError, match=r"overlap this run's \(--shard 0/3\)"):
            TrajectoryStore(folder, shard=(0, 3)).open()
        with TrajectoryStore(folder, shard=(1, 2)):  # the other half: no overlap
            pass
    with TrajectoryStore(folder):
        with pytest.raises(
            StoreLockedError, match=r"\(no --shard\), whose requests overlap this run's \(--shard 1/2\)"
        ):
            TrajectoryStore(folder, shard=(1, 2)).open()
    with TrajectoryStore(folder), TrajectoryStore(folder.parent / "other", shard=(0, 2)):
        pass  # other folders are not concerned
    # A refused store released its own lock: the tag can be written once the other writer is gone.
    with TrajectoryStore(folder, shard=(0, 3)):
        pass


def test_a_killed_runs_journal_is_recovered_by_a_run_of_another_tag(tmp_path):
    """Answers an unsharded run received before kill -9 are in its journal: a --shard rerun must count
    them done (it turns them into a shard) instead of asking them again."""
    folder = tmp_path / "m"
    store = TrajectoryStore(folder, rows_per_shard=100).open()
    for i in range(4):
        store.append(_row(i))
    os.close(store._lock_fd)  # killed: the kernel releases its lock, the journal stays
    store._lock_fd = None
    with TrajectoryStore(folder, shard=(1, 2)) as again:
        assert again.recovered_rows == 4
        assert all(again.is_done(key_digest(_row(i)["request_key"])) for i in range(4))
    assert not list(folder.glob("wal-*"))
    # A live writer's journal is left alone by a run of a tag that does not overlap it.
    live = TrajectoryStore(folder, shard=(0, 2), rows_per_shard=100).open()
    live.append(_row(7))
    with TrajectoryStore(folder, shard=(1, 2)) as beside:
        assert beside.recovered_rows == 0 and not beside.is_done(key_digest(_row(7)["request_key"]))
    assert len(list(folder.glob("wal-0of2-*"))) == 1
    live.close()
    with TrajectoryStore(folder) as last:
        assert len(last.done) == 5
    keys = pa.concat_tables(read_shard(p) for p in folder.glob("part-*.arrow"))["request_key"].to_pylist()
    assert len(keys) == len(set(keys)) == 5


def test_failure_ledger_records_and_success_clears(tmp_path):
    folder = tmp_path / "m"
    row = _row(1)
    with TrajectoryStore(folder) as store:
        store.record_failure(FailureRecord(row["request_key"], "s1", 0, "client", 400, "too long", 1, False))
        store.record_failure(FailureRecord(_row(2)["request_key"], "s2", 0, "server", 500, "boom", 6, True))
    with TrajectoryStore(folder) as store:
        assert key_digest(row["request_key"]) in store.failed_permanent
        assert key_digest(_row(2)["request_key"]) not in store.failed_permanent
        assert store.ledger.counts_by_kind() == {"client": 1, "server": 1}
        store.append(row)
        assert store.ledger.counts_by_kind() == {"server": 1}


def test_remove_rows_rewrites_shards_atomically(tmp_path):
    folder = tmp_path / "m"
    with TrajectoryStore(folder, rows_per_shard=2) as store:
        for i in range(5):
            row = _row(i)
            row["finish_reason"] = "length" if i % 2 else "stop"
            store.append(row)
    import pyarrow.compute as pc

    with TrajectoryStore(folder) as store:
        removed = store.remove_rows(lambda t: pc.fill_null(pc.equal(t["finish_reason"], "length"), False))
        assert sorted(r["sample_id"] for r in removed) == ["s1", "s3"]
        assert len(store.done) == 3
    left = pa.concat_tables(read_shard(p) for p in folder.glob("part-*.arrow"))
    assert sorted(left["sample_id"].to_pylist()) == ["s0", "s2", "s4"]


def test_roster_has_the_required_models_and_serve_commands():
    roster = load_roster()
    assert len(roster) >= 8
    for name in ("qwen2-vl", "qwen2.5-vl", "glm-4.5v", "kimi-vl", "internvl3", "llama-3.2-vision", "pixtral"):
        assert name in roster, name
    assert "medgemma" in roster or "gemma-3" in roster
    for spec in roster.values():
        command = spec.serve_command(port=8123)
        assert command.startswith(f"vllm serve {spec.hf_id} ")
        assert "--port 8123" in command and "--limit-mm-per-prompt" in command
        assert "--max-model-len" in command and "--tensor-parallel-size" in command
        assert 0 <= spec.sampling["temperature"] <= 2 and spec.sampling["max_tokens"] > 0
    assert "max_pixels" in roster["qwen2-vl"].serve_command()
    assert resolve_model("Qwen/Qwen2-VL-7B-Instruct").name == "qwen2-vl"
    adhoc = resolve_model("org/Some-VLM")
    assert not adhoc.in_roster and adhoc.dir_name == "org__Some-VLM"


def test_prompts_render_the_papers_elicitation_and_hash_exact_text():
    rationale = load_prompt("rationale")
    labels = {"Edema": 1.0, "Pleural Effusion": 1.0, "Cardiomegaly": -1.0, "Atelectasis": 0.0}
    text = rationale.render({"labels": labels, "view": "PA"})
    assert text == (
        "This is a patient's chest DR image. The patient is diagnosed with Edema and Pleural Effusion. "
        "Please explain the basis for the diagnosis of Edema and Pleural Effusion."
    )
    assert "No Finding" in rationale.render({"labels": {}, "view": "AP"})
    assert prompt_hash(text) != prompt_hash(text + " ")
    structured = load_prompt("structured").render({"labels": labels, "view": "AP"})
    assert "Support Devices" in structured and "AP view" in structured
    assert load_prompt("diagnosis").id == "diagnosis-v1"
    with pytest.raises(InputError, match="unknown placeholder"):
        parse_template("id: x\n---\nHello {name}", "t.txt")
    with pytest.raises(InputError, match="template id"):
        parse_template("---\nHello", "t.txt")
    with pytest.raises(InputError, match="unknown prompt"):
        load_prompt("no-such-prompt")


@pytest.mark.parametrize(
    ("url", "local"),
    [
        ("http://127.0.0.1:8000/v1", True),
        ("http://localhost:8000/v1", True),
        ("http://[::1]:8000/v1", True),
        ("http://10.1.2.3:8000/v1", True),
        ("http://192.168.0.7/v1", True),
        ("http://172.20.0.2:8000/v1", True),
        ("http://gpu-node.local:8000/v1", True),
        ("http://8.8.8.8:8000/v1", False),
        ("https://1.1.1.1/v1", False),
        ("http://172.32.0.1/v1", False),
    ],
)
def test_governance_classifies_endpoints(url, local):
    assert endpoint_is_local(url, resolve=False)[0] is local


def test_governance_refuses_external_endpoints_with_the_dua_explained():
    with pytest.raises(ExternalEndpointError) as info:
        check_endpoints(["http://127.0.0.1:8000/v1", "https://8.8.4.4/v1"])
    message = str(info.value)
    assert "8.8.4.4" in message and "data use agreement" in message and "--allow-external-endpoint" in message
    check_endpoints(["https://8.8.4.4/v1"], allow_external=True)


@pytest.mark.parametrize(
    ("url", "pattern"),
    [
        ("localhost:8000/v1", r"has no scheme: write http://localhost:8000/v1"),
        ("ftp://127.0.0.1/v1", r"must start with http:// or https://"),
        ("http:///v1", r"has no host"),
        ("http://127.0.0.1:99999/v1", r"invalid port"),
        # urlsplit reads the host 127.0.0.1 in these; the HTTP client does not: refused as malformed,
        # never judged local by one parser and sent by the other
        ("http://127.0.0.1:8000.evil.com/v1", r"invalid port"),
        ("http://8.8.8.8\\@127.0.0.1/v1", r"not a valid URL"),
        ("http://[::1].evil.com/v1", r"not a valid URL"),
    ],
)
def test_governance_refuses_base_urls_that_are_not_plain_http_urls(url, pattern):
    with pytest.raises(InputError, match=pattern):
        check_endpoints([url])
    with pytest.raises(InputError, match=pattern):
        check_endpoints([url], allow_external=True)


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("http://0.0.0.0:8000/v1", "0.0.0.0 is the unspecified address"),
        ("http://[::]:8000/v1", ":: is the unspecified address"),
        ("http://[::ffff:8.8.8.8]:8000/v1", "public address"),
    ],
)
def test_governance_refuses_addresses_that_only_look_local(url, why):
    with pytest.raises(ExternalEndpointError, match=why):
        check_endpoints([url])
    check_endpoints([url], allow_external=True)


@pytest.mark.parametrize(
    "url",
    ["http://localhost.evil.com:8000/v1", "http://127.0.0.1.nip.io:8000/v1", "http://127.0.0.1.evil.com/v1"],
)
def test_governance_judges_names_that_start_like_local_ones_by_their_addresses(url):
    """Not local by name; with DNS they count as local only if every address they resolve to is."""
    assert endpoint_is_local(url, resolve=False)[0] is False


def test_token_bucket_spaces_requests():
    async def run():
        bucket = TokenBucket(per_minute=600, burst=1)  # 10 per second
        start = time.monotonic()
        for _ in range(6):
            await bucket.acquire(1)
        return time.monotonic() - start

    assert asyncio.run(run()) >= 0.45
