"""Tokenization for APO and SFT: the chat template renders each turn, ``datasets.map`` encodes once.

Images are referenced by ``image_path`` relative to the MIMIC-CXR root and loaded through
``cxrmax.mimic.images.preprocess`` (the same downscaling generate uses), then handed to the model's
processor.

Tokenization happens once, up front, with ``datasets.map`` (written to Arrow, memory flat in the
number of rows): the user turn (image + prompt) is rendered with the chat template and encoded with
the processor *once per sample*; each completion is the text the chat template appends for the
assistant turn (its end-of-turn tokens included). The loss only ever sees completion tokens.

Truncation policy (``max_length`` counts prompt + image tokens + completion):
  * the prompt and the image tokens are never cut; a sample whose prompt leaves fewer than
    ``min_completion_tokens`` is dropped (counted as ``dropped_prompt_too_long``);
  * completions are cut from the end to fit (counted per completion as ``truncated_chosen`` /
    ``truncated_rejected``);
  * empty or missing negatives are removed (``empty_rejected``), and so are negatives whose text equals
    the positive's up to whitespace (``identical_rejected``: they carry no preference and only dilute
    the Plackett-Luce denominator), also when they only become equal once cut to the budget; a sample
    left without negatives is dropped (``dropped_no_rejected``);
  * a missing positive/prompt is an InputError naming the dataset, row and field (``lenient``: dropped,
    counted as ``dropped_invalid``); so is an image that is missing or cannot be decoded (``lenient``:
    counted as ``dropped_bad_image``);
  * a column of the wrong type is an InputError before any row is read (``load.check_column_types``),
    and a dataset left with no sample at all is an InputError that lists why each row was dropped
    (training on nothing would only fail later, less clearly).
"""

from __future__ import annotations

import io
import os
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import torch
from jinja2 import TemplateError
from PIL import Image

from apo_train.data.load import check_column_types
from cxrmax.core.errors import InputError, where
from cxrmax.mimic.images import encode_jpeg, preprocess

#: (prompt, image path) encodings a ChatEncoder remembers while tokenizing (ids of a few hundred
#: tokens each: a few MB at most).
PROMPT_MEMO_SIZE = 4096


class ChatEncoder:
    """Encodes a user turn (optional image + prompt text) and assistant completions for one model.

    ``processor`` is a VLM processor (with ``image_processor`` and ``tokenizer``) or a plain tokenizer
    (text-only model: images are ignored). ``image_root`` is the MIMIC-CXR root that ``image_path`` is
    relative to; ``max_edge`` / ``max_pixels`` are handed to ``cxrmax.mimic.images.preprocess``.
    ``jpeg_quality``: re-encode the preprocessed image as JPEG at this quality and decode it again,
    which is what generate's backends deliver to a model (quality 90), so the model trains on the pixels
    it is later asked about; None keeps the decoded image. ``image_cache_size``: the vision tensors of
    that many images are kept (least recently used out) by :meth:`image_inputs`, so a collator does not
    decode and process an image again at every step it appears in; 0 keeps none.

    Tokenizing remembers the last :data:`PROMPT_MEMO_SIZE` encoded (prompt, image path) pairs: an SFT
    split holds every source model's answer to the same image and prompt (seven rows per image in
    CXR-MAX), and the prompt's encoding (decoding and resizing the film to count its image tokens,
    then the processor) is the same for all of them.
    """

    def __init__(
        self,
        processor: Any,
        image_root: str | os.PathLike | None = None,
        max_edge: int = 1024,
        max_pixels: int | None = None,
        system_prompt: str | None = None,
        jpeg_quality: int | None = None,
        image_cache_size: int = 0,
    ) -> None:
        self.processor = processor
        self.jpeg_quality = jpeg_quality
        if image_cache_size < 0:
            raise InputError(f"image_cache_size must be 0 or more, not {image_cache_size}")
        self.image_cache_size = image_cache_size
        self._vision_cache: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()
        self._prompt_memo: OrderedDict[tuple[str, str | None], tuple[list[int], list[int]]] = OrderedDict()
        self.is_vlm = hasattr(processor, "image_processor") and hasattr(processor, "tokenizer")
        self.tokenizer = processor.tokenizer if self.is_vlm else processor
        self.image_root = Path(image_root) if image_root is not None else None
        self.max_edge = max_edge
        self.max_pixels = max_pixels
        self.system_prompt = system_prompt
        pad = self.tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else self.tokenizer.eos_token_id
        if self.pad_token_id is None:
            raise ValueError("the tokenizer has neither a pad nor an eos token")
        # Some VLMs ship the chat template with the tokenizer only (older LLaVA exports): use it there.
        if self.is_vlm and getattr(processor, "chat_template", None):
            self._template_owner = processor
        elif getattr(self.tokenizer, "chat_template", None):
            self._template_owner = self.tokenizer
        else:
            name = getattr(self.tokenizer, "name_or_path", "") or "the model"
            raise InputError(
                f"{name}: neither the processor nor the tokenizer has a chat template (a base model?); "
                "train from an instruct/chat checkpoint or set a chat_template on its tokenizer"
            )

    @property
    def uses_images(self) -> bool:
        return self.is_vlm and self.image_root is not None

    def _messages(self, prompt: str, with_image: bool) -> list[dict[str, Any]]:
        messages: list[dict[str, Any]] = []
        if self.system_prompt:
            messages.append({"role": "system", "content": [{"type": "text", "text": self.system_prompt}]})
        content: list[dict[str, Any]] = [{"type": "image"}] if with_image else []
        content.append({"type": "text", "text": prompt})
        if not self.is_vlm:  # text tokenizers' templates expect plain strings
            messages = [{"role": m["role"], "content": m["content"][-1]["text"]} for m in messages]
            return messages + [{"role": "user", "content": prompt}]
        return messages + [{"role": "user", "content": content}]

    def _render(self, messages: list[dict[str, Any]], add_generation_prompt: bool) -> str:
        try:
            return self._template_owner.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        except TemplateError as exc:  # templates raise_exception() on roles they do not support
            name = getattr(self.tokenizer, "name_or_path", "") or "the model"
            hint = " (it may not accept a system message: drop system_prompt)" if self.system_prompt else ""
            raise InputError(f"{name}: its chat template refused the conversation: {exc}{hint}") from exc

    def load_image(self, image_path: str, row: int | None = None) -> Any:
        """The preprocessed image (RGB PIL) for a path relative to ``image_root``."""
        if self.image_root is None:
            raise InputError("image_root (the MIMIC-CXR root) is needed to load images")
        full = self.image_root / image_path
        if not full.is_file():
            raise InputError(
                f"{where(full)}: image not found (image_path {image_path!r} under the image root)"
            )
        image = preprocess(full, max_edge=self.max_edge, max_pixels=self.max_pixels)
        if self.jpeg_quality is not None:
            image = Image.open(io.BytesIO(encode_jpeg(image, quality=self.jpeg_quality)))
        return image.convert("RGB")

    def vision_inputs(self, image: Any) -> dict[str, torch.Tensor]:
        """pixel_values / image_grid_thw (etc.) for one image, exactly as the processor makes them."""
        out = self.processor.image_processor(images=[image], return_tensors="pt")
        return {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}

    def image_inputs(self, image_path: str) -> dict[str, torch.Tensor]:
        """:meth:`vision_inputs` of the image at ``image_path``, from the cache when it holds them."""
        cached = self._vision_cache.get(image_path)
        if cached is not None:
            self._vision_cache.move_to_end(image_path)
            return cached
        inputs = self.vision_inputs(self.load_image(image_path))
        if self.image_cache_size:
            self._vision_cache[image_path] = inputs
            if len(self._vision_cache) > self.image_cache_size:
                self._vision_cache.popitem(last=False)
        return inputs

    def encode_prompt(self, prompt: str, image: Any | None) -> list[int]:
        """Token ids of the chat-formatted user turn + assistant header (image tokens expanded)."""
        return self.encode_prompt_with_types(prompt, image)[0]

    def encode_prompt_with_types(self, prompt: str, image: Any | None) -> tuple[list[int], list[int]]:
        """Prompt ids and the processor's ``mm_token_type_ids`` (empty when it makes none).

        Recent Qwen-VL models need the token types to place multimodal rotary positions."""
        text = self._render(self._messages(prompt, image is not None), add_generation_prompt=True)
        if image is not None:
            # The rendered text already holds every special token the template wants (a BOS included);
            # letting the tokenizer add its own would double it, as transformers' apply_chat_template knows.
            out = self.processor(text=[text], images=[image], return_tensors="pt", add_special_tokens=False)
            types = out.get("mm_token_type_ids")
            return out["input_ids"][0].tolist(), ([] if types is None else types[0].tolist())
        return self.tokenizer(text, add_special_tokens=False)["input_ids"], []

    def remembered_prompt(self, prompt: str, image_path: str | None) -> tuple[list[int], list[int]] | None:
        """The ids and token types :meth:`encode_prompt_with_types` gave for this prompt and image
        path earlier in this process, or None (see the class docstring)."""
        found = self._prompt_memo.get((prompt, image_path))
        if found is not None:
            self._prompt_memo.move_to_end((prompt, image_path))
        return found

    def remember_prompt(
        self, prompt: str, image_path: str | None, encoded: tuple[list[int], list[int]]
    ) -> None:
        """Keep ``encoded`` for :meth:`remembered_prompt` (the oldest of PROMPT_MEMO_SIZE out)."""
        self._prompt_memo[(prompt, image_path)] = encoded
        if len(self._prompt_memo) > PROMPT_MEMO_SIZE:
            self._prompt_memo.popitem(last=False)

    def completion_parts(self, prompt: str, completion: str) -> tuple[str, str, str]:
        """The assistant turn the chat template appends for ``completion``, as (lead, body, trail).

        ``body`` is the completion as the template renders it (some trim it, like Llama-3's ``| trim``),
        ``lead`` what the template writes before it beyond the generation prompt (an empty think block,
        say) and ``trail`` its end of turn. Found by rendering once with a placeholder, so nothing is
        guessed from the completion's own text. A template that does not show the placeholder falls
        back to (completion, eos)."""
        user = self._messages(prompt, with_image=False)
        head = self._render(user, add_generation_prompt=True)
        marked = self._render([*user, self._assistant(_PLACEHOLDER)], add_generation_prompt=False)
        full = self._render([*user, self._assistant(completion)], add_generation_prompt=False)
        before, found, after = marked.partition(_PLACEHOLDER)
        if (
            found
            and full.startswith(before)
            and full.endswith(after)
            and len(full) >= len(before) + len(after)
        ):
            body = full[len(before) : len(full) - len(after)]
            lead = before[len(head) :] if before.startswith(head) else ""
            return lead, body, after
        return "", completion, self.tokenizer.eos_token or ""

    def _assistant(self, text: str) -> dict[str, Any]:
        if self.is_vlm:
            return {"role": "assistant", "content": [{"type": "text", "text": text}]}
        return {"role": "assistant", "content": text}

    def completion_text(self, prompt: str, completion: str) -> str:
        """What the chat template appends after the generation prompt for an assistant turn holding
        ``completion`` (end-of-turn tokens included)."""
        return "".join(self.completion_parts(prompt, completion))

    def encode_completion(self, prompt: str, completion: str) -> list[int]:
        """Token ids of the assistant turn. The completion's own text is encoded with special tokens
        split: a model answer that happens to contain ``<|im_end|>`` or ``<|image_pad|>`` (leaked
        template text is common in real VLM output) must not end the turn early or add an image slot
        the model has no pixels for."""
        lead, body, trail = self.completion_parts(prompt, completion)
        ids: list[int] = []
        if lead:
            ids += self.tokenizer(lead, add_special_tokens=False)["input_ids"]
        ids += self.tokenizer(body, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        if trail:
            ids += self.tokenizer(trail, add_special_tokens=False)["input_ids"]
        return ids


#: Stands in for the completion when locating it in a rendered conversation (no whitespace, so
#: templates that trim leave it intact; no markup a template would interpret).
_PLACEHOLDER = "CXRMAXCOMPLETIONPLACEHOLDER7f3a"


# ------------------------------------------------------------------------------------ truncation stats
@dataclass
class TruncationStats:
    """What tokenization kept, cut and dropped (reported before training starts)."""

    samples_in: int = 0
    samples_kept: int = 0
    dropped_prompt_too_long: int = 0
    dropped_no_rejected: int = 0
    dropped_invalid: int = 0
    dropped_bad_image: int = 0
    truncated_chosen: int = 0
    truncated_rejected: int = 0
    empty_rejected: int = 0
    identical_rejected: int = 0
    rejected_kept: int = 0
    max_prompt_tokens: int = 0
    extra: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _truncate(ids: list[int], budget: int) -> tuple[list[int], bool]:
    if len(ids) > budget:
        return ids[:budget], True
    return ids, False


def _order_negatives(rejected: list[str | None], drift: list[float | None] | None) -> list[int]:
    """Ranking order for negatives, best (least drifting) first.

    build-preferences stores negatives most-drifting first; the listwise loss wants the ranking
    positive > least drifting > ... > most drifting. With drift scores we sort by them (stable), else
    we reverse the stored order. Plackett-Luce and pairwise losses do not depend on this order."""
    idx = list(range(len(rejected)))
    if (
        drift is not None
        and len(drift) == len(rejected)
        and all(d is not None and d == d for d in drift)  # d == d: NaN would make the sort arbitrary
    ):
        return sorted(idx, key=lambda i: drift[i])
    return idx[::-1]


def _encode_prompt(
    row: dict[str, Any],
    index: int,
    completion_field: str,
    result: dict[str, Any],
    encoder: ChatEncoder,
    max_length: int,
    min_completion_tokens: int,
    lenient: bool,
    source: str | os.PathLike,
) -> int | None:
    """Validate a row's prompt, completion and image and encode the prompt into ``result``.

    Returns the token budget left for each completion, or None when the row is dropped (the reason
    is in ``result["drop_reason"]``); raises InputError instead of dropping unless ``lenient``."""
    for name in ("prompt", completion_field):
        value = row.get(name)
        if not isinstance(value, str) or not value.strip():
            if not lenient:
                what = (
                    "missing or empty"
                    if value is None or isinstance(value, str)
                    else f"not text ({type(value).__name__})"
                )
                raise InputError(f"{where(source, index + 1, name)}: {what}")
            result["drop_reason"] = "invalid"
            return None
    image_path = None
    if encoder.uses_images:
        image_path = row.get("image_path")
        if not image_path:
            if not lenient:
                raise InputError(f"{where(source, index + 1, 'image_path')}: missing")
            result["drop_reason"] = "invalid"
            return None
    encoded = encoder.remembered_prompt(row["prompt"], image_path)
    if encoded is None:
        image = None
        if image_path is not None:
            try:
                image = encoder.load_image(image_path, index + 1)
            except InputError as exc:  # missing file, or ImageError: truncated / corrupt / undecodable
                if not lenient:
                    raise InputError(f"{where(source, index + 1, 'image_path')}: {exc}") from exc
                result["drop_reason"] = "bad_image"
                return None
        encoded = encoder.encode_prompt_with_types(row["prompt"], image)
        encoder.remember_prompt(row["prompt"], image_path, encoded)
    prompt_ids, prompt_types = encoded
    result["prompt_input_ids"] = prompt_ids
    result["prompt_mm_token_type_ids"] = prompt_types
    result["n_prompt_tokens"] = len(prompt_ids)
    budget = max_length - len(prompt_ids)
    if budget < min_completion_tokens:
        result["drop_reason"] = "prompt_too_long"
        return None
    return budget


def tokenize_preferences(
    dataset: Any,
    encoder: ChatEncoder,
    max_length: int = 4096,
    max_negatives: int | None = None,
    min_completion_tokens: int = 1,
    lenient: bool = False,
    num_proc: int | None = None,
    source: str | os.PathLike = "preferences",
) -> tuple[Any, TruncationStats]:
    """Tokenize PREFERENCE_SCHEMA rows into prompt/chosen/rejected ids (see the module's truncation policy).

    ``max_negatives`` keeps the K most drifting negatives of each sample. Returns the tokenized dataset
    (rows dropped by the policy removed; columns ``sample_id``, ``image_path``, ``prompt_input_ids``,
    ``chosen_input_ids``, ``rejected_input_ids``) and the counts."""

    def encode(row: dict[str, Any], index: int) -> dict[str, Any]:
        result = {
            "prompt_input_ids": [],
            "prompt_mm_token_type_ids": [],
            "chosen_input_ids": [],
            "rejected_input_ids": [],
            "drop_reason": None,
            "n_truncated_chosen": 0,
            "n_truncated_rejected": 0,
            "n_empty_rejected": 0,
            "n_identical_rejected": 0,
            "n_rejected_kept": 0,
            "n_prompt_tokens": 0,
        }
        budget = _encode_prompt(
            row, index, "chosen", result, encoder, max_length, min_completion_tokens, lenient, source
        )
        if budget is None:
            return result
        prompt, chosen = row["prompt"], row["chosen"]
        raw_rejected = list(row.get("rejected") or [])
        order = _order_negatives(raw_rejected, row.get("rejected_drift"))
        kept = [i for i in order if isinstance(raw_rejected[i], str) and raw_rejected[i].strip()]
        result["n_empty_rejected"] = len(raw_rejected) - len(kept)
        chosen_words = chosen.split()
        distinct = [i for i in kept if raw_rejected[i].split() != chosen_words]
        result["n_identical_rejected"] = len(kept) - len(distinct)
        kept = distinct
        if max_negatives is not None and len(kept) > max_negatives:
            # The most drifting ones are the last in ranking order.
            kept = kept[len(kept) - max_negatives :]
        if not kept:
            result["drop_reason"] = "no_rejected"
            return result
        chosen_ids, cut = _truncate(encoder.encode_completion(prompt, chosen), budget)
        result["chosen_input_ids"] = chosen_ids
        result["n_truncated_chosen"] = int(cut)
        rejected_ids = []
        for i in kept:
            ids, cut = _truncate(encoder.encode_completion(prompt, raw_rejected[i]), budget)
            if ids == chosen_ids:
                # Answers often share a long opening; cut to the budget they can become the positive.
                result["n_identical_rejected"] += 1
                continue
            rejected_ids.append(ids)
            result["n_truncated_rejected"] += int(cut)
        if not rejected_ids:
            result["drop_reason"] = "no_rejected"
            return result
        result["rejected_input_ids"] = rejected_ids
        result["n_rejected_kept"] = len(rejected_ids)
        return result

    check_column_types(dataset, ("prompt", "chosen", "image_path"), ("rejected",), source)
    return _run_map(dataset, encode, num_proc, kind="preferences", source=source)


def tokenize_sft(
    dataset: Any,
    encoder: ChatEncoder,
    max_length: int = 2304,
    min_completion_tokens: int = 1,
    lenient: bool = False,
    num_proc: int | None = None,
    source: str | os.PathLike = "sft",
) -> tuple[Any, TruncationStats]:
    """Tokenize SFT_SCHEMA rows into ``prompt_input_ids`` + ``completion_input_ids`` (same policy) and
    ``length`` (the row's tokens, for apo_train.data.sampling)."""

    def encode(row: dict[str, Any], index: int) -> dict[str, Any]:
        result = {
            "prompt_input_ids": [],
            "completion_input_ids": [],
            "drop_reason": None,
            "n_truncated_chosen": 0,
            "n_prompt_tokens": 0,
            "length": 0,
        }
        budget = _encode_prompt(
            row, index, "completion", result, encoder, max_length, min_completion_tokens, lenient, source
        )
        if budget is None:
            return result
        prompt, completion = row["prompt"], row["completion"]
        ids, cut = _truncate(encoder.encode_completion(prompt, completion), budget)
        result["completion_input_ids"] = ids
        result["n_truncated_chosen"] = int(cut)
        result["length"] = result["n_prompt_tokens"] + len(ids)
        return result

    check_column_types(dataset, ("prompt", "completion", "image_path"), (), source)
    return _run_map(dataset, encode, num_proc, kind="sft", source=source)


def _run_map(
    dataset: Any, encode: Any, num_proc: int | None, kind: str, source: str | os.PathLike
) -> tuple[Any, TruncationStats]:
    if len(dataset) == 0:
        raise InputError(f"{where(source)}: the {kind} split has no rows")
    keep = {"sample_id", "image_path"}
    remove = [c for c in dataset.column_names if c not in keep]
    mapped = dataset.map(
        encode,
        with_indices=True,
        remove_columns=remove,
        num_proc=num_proc,
        desc=f"tokenizing {kind}",
    )
    stats = TruncationStats(samples_in=len(mapped))
    # Counting reads only small scalar columns through Arrow compute, never the token lists, so memory
    # stays flat in the number of rows.
    table = mapped.data.table if hasattr(mapped.data, "table") else mapped.data
    reasons = table.column("drop_reason").cast(pa.string())  # an all-null column comes typed as null
    kept_rows = pc.is_null(reasons)

    def total(name: str, only_kept: bool = False) -> int:
        if name not in table.column_names:
            return 0
        column = pc.filter(table.column(name), kept_rows) if only_kept else table.column(name)
        return int(pc.sum(column).as_py() or 0)

    counts = pc.value_counts(pc.fill_null(reasons, "kept")).to_pylist()
    by_reason = {c["values"]: c["counts"] for c in counts}
    stats.dropped_prompt_too_long = by_reason.get("prompt_too_long", 0)
    stats.dropped_no_rejected = by_reason.get("no_rejected", 0)
    stats.dropped_invalid = by_reason.get("invalid", 0)
    stats.dropped_bad_image = by_reason.get("bad_image", 0)
    stats.truncated_chosen = total("n_truncated_chosen")
    stats.truncated_rejected = total("n_truncated_rejected")
    stats.empty_rejected = total("n_empty_rejected")
    stats.identical_rejected = total("n_identical_rejected")
    stats.rejected_kept = total("n_rejected_kept", only_kept=True)
    kept_lengths = pc.filter(table.column("n_prompt_tokens"), kept_rows)
    stats.max_prompt_tokens = int(pc.max(kept_lengths).as_py() or 0) if len(kept_lengths) else 0
    kept = mapped.filter(lambda r: r is None, input_columns="drop_reason", desc="dropping")
    stats.samples_kept = len(kept)
    if stats.samples_in and not stats.samples_kept:
        reasons = ", ".join(f"{n} {r}" for r, n in sorted(by_reason.items()))
        raise InputError(
            f"{where(source)}: no {kind} sample left to train on after tokenization "
            f"(dropped: {reasons}; prompts are never cut: completions are truncated to max_length, and a prompt longer than it drops its row"
            + ("; raise max_length or lower max_edge/max_pixels" if "prompt_too_long" in by_reason else "")
            + ")"
        )
    drop = [c for c in kept.column_names if c.startswith("n_") or c == "drop_reason"]
    return kept.remove_columns(drop), stats
