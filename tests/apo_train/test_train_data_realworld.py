"""The APO/SFT training-data path on inputs it was not written against: other chat templates, tokenizers
without a pad token, 0 or 12 negatives, over-long and empty completions, duplicated positives, unicode,
missing/corrupt images, malformed datasets, and batches mixing very different negative counts (checked
on real forward passes of tiny models built in code)."""

from __future__ import annotations

from pathlib import Path

import datasets
import pyarrow as pa
import pytest
import torch
from PIL import Image

from apo_train.config import APOConfig
from apo_train.data import (
    IGNORE_INDEX,
    APOCollator,
    ChatEncoder,
    load_split,
    tokenize_preferences,
    tokenize_sft,
)
from apo_train.modeling import load_model, load_processor
from apo_train.trainer import completion_logps, run_apo
from cxrmax.core.errors import InputError
from cxrmax.core.schemas import PREFERENCE_SCHEMA, SFT_SCHEMA

PROMPT = "This is a patient's chest DR image. Please explain the basis for the diagnosis of pleural effusion."
POSITIVE = (
    "Blunting of the left costophrenic angle with a meniscus sign suggests a small left pleural effusion."
)
NEGATIVES = [
    "No acute cardiopulmonary process.",
    "Right lower lobe consolidation consistent with pneumonia.",
    "Mild pulmonary edema with cardiomegaly.",
    "Left pneumothorax without mediastinal shift.",
    "Patchy bibasilar atelectasis, likely due to low lung volumes.",
    "Stable sternotomy wires and mediastinal clips.",
    "Possible rib fracture on the right; cannot exclude.",
    "Heart size is normal. Lungs are clear.",
    "Interstitial markings increased since the prior study.",
    "Small nodule in the right upper lobe, follow-up suggested.",
    "Elevated right hemidiaphragm, unchanged.",
    "Endotracheal tube tip terminates 4 cm above the carina.",
]
MARKDOWN_EMOJI = (
    "## Findings 🫁\n\n- **Left** base: blunted CP angle → effusion ≈ 200 mL\n"
    "- Épanchement pleural gauche (français), 胸水 (中文)\n\n| side | finding |\n|---|---|\n| L | effusion |"
)

# ------------------------------------------------------------------------------------ chat templates
#: Llama-3 style: a BOS in the text, header tokens, content trimmed by the template.
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + m['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
#: Gemma style: the assistant is called "model", no system role.
GEMMA_TEMPLATE = (
    "{% for m in messages %}{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
    "{{ '<start_of_turn>' + role + '\\n' + m['content'] | trim + '<end_of_turn>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)
#: A reasoning model's template: an assistant turn carries an (empty) think block the generation prompt lacks.
THINKING_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{% else %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
#: A VLM template that renders the text before the image.
IMAGE_AFTER_TEXT_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' }}"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for p in m['content'] if p['type'] == 'text' %}{{ p['text'] }}{% endfor %}"
    "{% for p in m['content'] if p['type'] == 'image' %}{{ '\\n<|vision_start|><|image_pad|><|vision_end|>' }}{% endfor %}"
    "{% endif %}{{ '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def save_rows(
    rows: list[dict], path: Path, schema: pa.Schema = PREFERENCE_SCHEMA, split: str = "train"
) -> Path:
    datasets.DatasetDict({split: datasets.Dataset(pa.Table.from_pylist(rows, schema=schema))}).save_to_disk(
        str(path)
    )
    return path


def pref_row(i: int, **changes) -> dict:
    row = {
        "sample_id": f"s{i}",
        "split": "train",
        "image_path": "files/p10/p10000032/s50414267/a.jpg",
        "prompt": PROMPT,
        "chosen": POSITIVE,
        "rejected": list(NEGATIVES[:3]),
        "rejected_drift": None,
    }
    row.update(changes)
    return row


def text_tokenizer(tiny_lm_path: Path, template: str | None = None, pad: bool = True, side: str = "right"):
    tokenizer = load_processor(tiny_lm_path)
    if template is not None:
        tokenizer.chat_template = template
        tokenizer.bos_token = "<|endoftext|>"
    if not pad:
        tokenizer.pad_token = None
    tokenizer.padding_side = side
    return tokenizer


@pytest.fixture(scope="module")
def image_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mimic-root")
    good = root / "files/p10/p10000032/s50414267"
    good.mkdir(parents=True)
    Image.linear_gradient("L").resize((200, 240)).save(good / "a.jpg")
    (good / "truncated.jpg").write_bytes((good / "a.jpg").read_bytes()[:300])
    (good / "empty.png").write_bytes(b"")
    (good / "report.jpg").write_text("FINDINGS: not an image at all\n")
    return root


# -------------------------------------------------------------------- templates, pad tokens, unicode
TEMPLATE_CASES = {
    "chatml-default-system": dict(template=None),
    "chatml-explicit-system": dict(template=None, system_prompt="You are an expert thoracic radiologist."),
    "llama3-trims": dict(template=LLAMA3_TEMPLATE),
    "gemma-model-role": dict(template=GEMMA_TEMPLATE),
    "thinking-empty-block": dict(template=THINKING_TEMPLATE),
    "no-pad-token": dict(template=None, pad=False),
    "left-padding-side": dict(template=None, side="left"),
}
COMPLETIONS = {
    "plain": POSITIVE,
    "markdown-emoji-cjk": MARKDOWN_EMOJI,
    "surrounding-whitespace": "\n  " + POSITIVE + "  \n\n",
    "html-and-template-syntax": "<b>Effusion</b> {{ bos_token }} {% if x %}\\n</think> [INST] 50% ~ `code`",
}


@pytest.mark.parametrize("completion_kind", sorted(COMPLETIONS))
@pytest.mark.parametrize("case", sorted(TEMPLATE_CASES))
def test_completion_is_what_the_template_appends(tiny_lm_path, tmp_path, case, completion_kind):
    """prompt ids + completion ids decode to exactly the template's rendering of the conversation, for
    every template, so training sees the model's own end-of-turn (not a guessed eos)."""
    settings = dict(TEMPLATE_CASES[case])
    system_prompt = settings.pop("system_prompt", None)
    tokenizer = text_tokenizer(tiny_lm_path, **settings)
    encoder = ChatEncoder(tokenizer, system_prompt=system_prompt)
    completion = COMPLETIONS[completion_kind]
    path = save_rows(
        [pref_row(0, rejected=[NEGATIVES[0], "🫁 " + NEGATIVES[1] + " ✅"], chosen=completion)],
        tmp_path / "p",
    )
    ds, stats = tokenize_preferences(load_split(path), encoder, max_length=1024, source=path)
    assert stats.samples_kept == 1 and stats.truncated_chosen == 0 and stats.rejected_kept == 2
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
        {"role": "user", "content": PROMPT},
        {"role": "assistant", "content": completion},
    ]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    row = ds[0]
    decoded = tokenizer.decode(
        row["prompt_input_ids"] + row["chosen_input_ids"], clean_up_tokenization_spaces=False
    )
    assert decoded == rendered
    batch = APOCollator(encoder)([row])
    pad_id = tokenizer.pad_token_id if settings.get("pad", True) else tokenizer.eos_token_id
    assert encoder.pad_token_id == pad_id
    p = len(row["prompt_input_ids"])
    for r in range(batch["input_ids"].shape[0]):  # right padding whatever the tokenizer's side
        assert batch["input_ids"][r, :p].tolist() == row["prompt_input_ids"]
        n = int(batch["attention_mask"][r].sum())
        assert (batch["input_ids"][r, n:] == pad_id).all() and (batch["labels"][r, n:] == IGNORE_INDEX).all()
        assert (batch["labels"][r, :p] == IGNORE_INDEX).all() and (
            batch["labels"][r, p:n] != IGNORE_INDEX
        ).all()


# ------------------------------------------------------------------------------- per-row edge cases
ROW_CASES = {
    # name: (row changes, tokenize kwargs, expected stats subset)
    "zero-negatives-beside-good-rows": (dict(rejected=[]), {}, dict(samples_kept=2, dropped_no_rejected=1)),
    "null-negatives": (dict(rejected=None), {}, dict(samples_kept=2, dropped_no_rejected=1)),
    "twelve-negatives": (dict(rejected=NEGATIVES), {}, dict(samples_kept=3, rejected_kept=6 + 12)),
    "twelve-negatives-capped": (dict(rejected=NEGATIVES), dict(max_negatives=6), dict(rejected_kept=6 + 6)),
    "empty-and-blank-negatives": (
        dict(rejected=["", "   \n", None, NEGATIVES[0]]),
        {},
        dict(samples_kept=3, empty_rejected=3, rejected_kept=6 + 1),
    ),
    "negative-identical-to-positive": (
        dict(rejected=[POSITIVE, " " + POSITIVE.replace(" ", "  ") + "\n", NEGATIVES[1]]),
        {},
        dict(samples_kept=3, identical_rejected=2, rejected_kept=6 + 1),
    ),
    "negatives-equal-to-the-positive-once-truncated": (
        dict(
            chosen=" ".join([POSITIVE] * 60) + " Left effusion.",
            rejected=[" ".join([POSITIVE] * 60) + " No effusion.", NEGATIVES[2]],
        ),
        {},
        dict(
            samples_kept=3,
            identical_rejected=1,
            truncated_chosen=1,
            truncated_rejected=0,
            rejected_kept=6 + 1,
        ),
    ),
    "only-negative-is-the-positive": (
        dict(rejected=[POSITIVE]),
        {},
        dict(samples_kept=2, dropped_no_rejected=1),
    ),
    "markdown-emoji-everywhere": (
        dict(chosen=MARKDOWN_EMOJI, rejected=[MARKDOWN_EMOJI[::-1], "🫁" * 40]),
        {},
        dict(samples_kept=3, rejected_kept=6 + 2),
    ),
    "long-positive": (dict(chosen=" ".join([POSITIVE] * 60)), {}, dict(samples_kept=3, truncated_chosen=1)),
    "long-negatives": (
        dict(rejected=[" ".join([n] * 60) for n in NEGATIVES[:4]]),
        {},
        dict(samples_kept=3, truncated_rejected=4),
    ),
    "prompt-longer-than-max-length": (
        dict(prompt=" ".join([PROMPT] * 40)),
        {},
        dict(samples_kept=2, dropped_prompt_too_long=1),
    ),
    "extra-columns-and-reasoning": (
        dict(reasoning="<think>the left angle is blunted</think>", rank_note="x"),
        {},
        dict(samples_kept=3, rejected_kept=9),
    ),
}


@pytest.mark.parametrize("case", sorted(ROW_CASES))
def test_row_edge_cases_train_or_are_counted(tiny_lm_path, tmp_path, case):
    changes, kwargs, expected = ROW_CASES[case]
    encoder = ChatEncoder(text_tokenizer(tiny_lm_path))
    rows = [pref_row(0), pref_row(1, **changes), pref_row(2)]
    extra = {k: v for k, v in changes.items() if k not in PREFERENCE_SCHEMA.names}
    if extra:  # a preferences set written by a newer/other tool: unknown columns are ignored
        table = pa.Table.from_pylist(rows, schema=PREFERENCE_SCHEMA)
        for name in extra:
            table = table.append_column(name, pa.array([None, extra[name], None], pa.string()))
        datasets.DatasetDict({"train": datasets.Dataset(table)}).save_to_disk(str(tmp_path / "p"))
        path = tmp_path / "p"
    else:
        path = save_rows(rows, tmp_path / "p")
    max_length = 160
    ds, stats = tokenize_preferences(load_split(path), encoder, max_length=max_length, source=path, **kwargs)
    got = stats.as_dict()
    assert {k: got[k] for k in expected} == expected
    for row in ds:
        budget = max_length - len(row["prompt_input_ids"])
        assert 1 <= len(row["chosen_input_ids"]) <= budget
        assert all(1 <= len(ids) <= budget for ids in row["rejected_input_ids"])
        chosen_text = encoder.tokenizer.decode(row["chosen_input_ids"])
        assert all(encoder.tokenizer.decode(ids) != chosen_text for ids in row["rejected_input_ids"])
    # Truncation keeps the beginning of a completion (the part the prompt conditions most).
    if "truncated_chosen" in expected:
        long_row = next(r for r in ds if r["sample_id"] == "s1")
        assert encoder.tokenizer.decode(long_row["chosen_input_ids"]).startswith(POSITIVE[:40])
    batch = APOCollator(encoder)(list(ds))
    assert batch["rejected_mask"].sum().item() == stats.rejected_kept


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (dict(chosen=""), r"row 2 field 'chosen': missing or empty"),
        (dict(chosen="  \n "), r"row 2 field 'chosen': missing or empty"),
        (dict(chosen=None), r"row 2 field 'chosen': missing or empty"),
        (dict(prompt=None), r"row 2 field 'prompt': missing or empty"),
    ],
)
def test_invalid_rows_name_the_dataset_row_and_field(tiny_lm_path, tmp_path, changes, message):
    path = save_rows([pref_row(0), pref_row(1, **changes)], tmp_path / "p")
    with pytest.raises(InputError, match=f"{tmp_path.name}.*{message}"):
        tokenize_preferences(load_split(path), ChatEncoder(text_tokenizer(tiny_lm_path)), source=path)


# ------------------------------------------------------------------------------- dataset-level errors
def _sft_saved_as_preferences(tmp_path: Path) -> Path:
    rows = [dict(sample_id="s0", prompt=PROMPT, completion=POSITIVE, image_path=None, model="m")]
    return save_rows(rows, tmp_path / "d", schema=SFT_SCHEMA)


def _rejected_as_one_string(tmp_path: Path) -> Path:
    ds = datasets.Dataset.from_list(
        [dict(sample_id="s0", prompt=PROMPT, chosen=POSITIVE, rejected=NEGATIVES[0])]
    )
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "d"))
    return tmp_path / "d"


def _chosen_as_list(tmp_path: Path) -> Path:
    ds = datasets.Dataset.from_list(
        [dict(sample_id="s0", prompt=PROMPT, chosen=[POSITIVE], rejected=NEGATIVES[:2])]
    )
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "d"))
    return tmp_path / "d"


def _rejected_as_numbers(tmp_path: Path) -> Path:
    ds = datasets.Dataset.from_list(
        [dict(sample_id="s0", prompt=PROMPT, chosen=POSITIVE, rejected=[0.3, 0.9])]
    )
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "d"))
    return tmp_path / "d"


def _only_validate_split(tmp_path: Path) -> Path:
    return save_rows([pref_row(0)], tmp_path / "d", split="validate")


def _every_row_without_negatives(tmp_path: Path) -> Path:
    return save_rows([pref_row(0, rejected=[]), pref_row(1, rejected=[POSITIVE])], tmp_path / "d")


def _parquet_not_save_to_disk(tmp_path: Path) -> Path:
    (tmp_path / "d").mkdir()
    datasets.Dataset.from_list([pref_row(0)]).to_parquet(str(tmp_path / "d" / "train.parquet"))
    return tmp_path / "d"


def _empty_split(tmp_path: Path) -> Path:
    return save_rows([], tmp_path / "d")


def _build_preferences_out_dir(tmp_path: Path) -> Path:
    save_rows([pref_row(0)], tmp_path / "d" / "preferences")
    return tmp_path / "d"


DATASET_CASES = {
    "empty-split": (_empty_split, r"the .train. split has no rows"),
    "out-dir-instead-of-preferences": (_build_preferences_out_dir, r"did you mean .*d/preferences"),
    "sft-dir-given-to-apo": (_sft_saved_as_preferences, r"field 'chosen': missing column"),
    "rejected-one-string": (_rejected_as_one_string, r"field 'rejected': expected a list of texts"),
    "chosen-a-list": (_chosen_as_list, r"field 'chosen': expected a text column"),
    "rejected-numbers": (_rejected_as_numbers, r"field 'rejected': expected a list of texts"),
    "split-missing": (_only_validate_split, r"no split 'train' \(have \['validate'\]\)"),
    "nothing-left": (_every_row_without_negatives, r"no preferences sample left.*2 no_rejected"),
    "not-save-to-disk": (_parquet_not_save_to_disk, r"not a dataset saved with save_to_disk"),
}


@pytest.mark.parametrize("case", sorted(DATASET_CASES))
def test_malformed_datasets_raise_input_errors(tiny_lm_path, tmp_path, case):
    make, message = DATASET_CASES[case]
    path = make(tmp_path)
    with pytest.raises(InputError, match=message):
        raw = load_split(path, "train", ("prompt", "chosen", "rejected"))
        tokenize_preferences(raw, ChatEncoder(text_tokenizer(tiny_lm_path)), source=path)


@pytest.mark.parametrize(
    ("drift", "expected_order"),
    [
        ([0.9, 0.2, 0.5], [1, 2, 0]),  # least drifting first
        ([float("nan"), 0.2, 0.5], [2, 1, 0]),  # a NaN score: stored order (most drifting first) reversed
        ([0.9, None, 0.5], [2, 1, 0]),
        ([0.9, 0.2], [2, 1, 0]),  # scores for fewer negatives than there are
    ],
)
def test_negative_order_with_unusable_drift_scores(tiny_lm_path, tmp_path, drift, expected_order):
    encoder = ChatEncoder(text_tokenizer(tiny_lm_path))
    negatives = NEGATIVES[:3]
    path = save_rows([pref_row(0, rejected=negatives, rejected_drift=drift)], tmp_path / "p")
    ds, _ = tokenize_preferences(load_split(path), encoder)
    decoded = [encoder.tokenizer.decode(ids).split("<|im_end|>")[0] for ids in ds[0]["rejected_input_ids"]]
    assert decoded == [negatives[i] for i in expected_order]


def test_single_dataset_dir_loads_like_a_split(tiny_lm_path, tmp_path):
    datasets.Dataset(pa.Table.from_pylist([pref_row(0)], schema=PREFERENCE_SCHEMA)).save_to_disk(
        str(tmp_path / "d")
    )
    ds, stats = tokenize_preferences(load_split(tmp_path / "d"), ChatEncoder(text_tokenizer(tiny_lm_path)))
    assert stats.samples_kept == 1 and len(ds[0]["rejected_input_ids"]) == 3


def test_an_empty_split_does_not_hide_the_others(tiny_lm_path, tmp_path):
    """datasets saves an empty split with zero shards and then cannot reload the whole DatasetDict."""
    table = pa.Table.from_pylist([pref_row(0)], schema=PREFERENCE_SCHEMA)
    empty = pa.Table.from_pylist([], schema=PREFERENCE_SCHEMA)
    datasets.DatasetDict(
        {"train": datasets.Dataset(table), "validate": datasets.Dataset(empty)}
    ).save_to_disk(str(tmp_path / "d"))
    assert len(load_split(tmp_path / "d", "train", ("prompt", "chosen", "rejected"))) == 1
    with pytest.raises(InputError, match=r"'validate' split has no rows"):
        load_split(tmp_path / "d", "validate")
    with pytest.raises(InputError, match=r"the preferences split has no rows"):
        tokenize_preferences(datasets.Dataset(empty), ChatEncoder(text_tokenizer(tiny_lm_path)))


def test_sft_rows_with_wrong_types_or_nothing_left(tiny_lm_path, tmp_path):
    encoder = ChatEncoder(text_tokenizer(tiny_lm_path))
    ds = datasets.Dataset.from_list([dict(sample_id="s0", prompt=PROMPT, completion=["a", "b"])])
    with pytest.raises(InputError, match="field 'completion': expected a text column"):
        tokenize_sft(ds, encoder, source="sft-dir")
    rows = [
        dict(sample_id="s0", prompt=" ".join([PROMPT] * 50), completion=POSITIVE, image_path=None, model="m")
    ]
    with pytest.raises(InputError, match="no sft sample left.*1 prompt_too_long"):
        tokenize_sft(load_split(save_rows(rows, tmp_path / "s", schema=SFT_SCHEMA)), encoder, max_length=64)


# ------------------------------------------------------------------------------------------- images
@pytest.mark.parametrize(
    "image_path",
    [
        "files/p10/p10000032/s50414267/missing.jpg",
        "files/p10/p10000032/s50414267/truncated.jpg",
        "files/p10/p10000032/s50414267/empty.png",
        "files/p10/p10000032/s50414267/report.jpg",
        "",
    ],
)
def test_bad_images_name_the_dataset_row_or_are_counted_when_lenient(
    tiny_vlm_path, image_root, tmp_path, image_path
):
    encoder = ChatEncoder(load_processor(tiny_vlm_path), image_root, max_edge=64)
    path = save_rows([pref_row(0), pref_row(1, image_path=image_path), pref_row(2)], tmp_path / "p")
    with pytest.raises(InputError, match=rf"{tmp_path.name}/p row 2 field 'image_path'"):
        tokenize_preferences(load_split(path), encoder, source=path)
    ds, stats = tokenize_preferences(load_split(path), encoder, lenient=True, source=path)
    assert stats.samples_kept == 2 and stats.dropped_bad_image + stats.dropped_invalid == 1
    assert sorted(ds["sample_id"]) == ["s0", "s2"]


@pytest.fixture(scope="module")
def vlm(tiny_vlm_path):
    return load_model(tiny_vlm_path, torch_dtype="float32").eval()


def _logps_by_sample(model, encoder: ChatEncoder, features: list[dict]) -> list[list[float]]:
    batch = APOCollator(encoder)(features)
    with torch.no_grad():
        logps, _ = completion_logps(model, batch)
    out = []
    for b in range(len(features)):
        rows = [int(batch["chosen_index"][b])] + batch["rejected_index"][b][
            batch["rejected_mask"][b]
        ].tolist()
        out.append(logps[rows].tolist())
    return out


@pytest.mark.parametrize("template", [None, IMAGE_AFTER_TEXT_TEMPLATE])
def test_vlm_logps_do_not_depend_on_batch_composition(vlm, tiny_vlm_path, image_root, tmp_path, template):
    """A sample's log-probs are the same alone (batch 1) and in a batch of 4 with 1..12 negatives."""
    processor = load_processor(tiny_vlm_path)
    if template is not None:
        processor.chat_template = template
    encoder = ChatEncoder(processor, image_root, max_edge=64)
    rows = [
        pref_row(0, rejected=NEGATIVES[:1]),
        pref_row(1, rejected=NEGATIVES, chosen=MARKDOWN_EMOJI),
        pref_row(2, rejected=NEGATIVES[:3], prompt="Describe the heart size."),
        pref_row(3, rejected=NEGATIVES[5:7], chosen=" ".join([POSITIVE] * 3)),
    ]
    ds, _ = tokenize_preferences(load_split(save_rows(rows, tmp_path / "p")), encoder, max_length=400)
    features = list(ds)
    if template is not None:  # the image tokens come after the prompt text
        ids = features[0]["prompt_input_ids"]
        image_token = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
        text_token = processor.tokenizer(" heart")["input_ids"][-1]
        assert ids.index(image_token) > max(
            i for i, t in enumerate(features[2]["prompt_input_ids"]) if t == text_token
        )
    together = _logps_by_sample(vlm, encoder, features)
    for b, feature in enumerate(features):
        alone = _logps_by_sample(vlm, encoder, [feature])[0]
        assert len(alone) == 1 + len(feature["rejected_input_ids"])
        assert torch.allclose(torch.tensor(alone), torch.tensor(together[b]), atol=1e-4, rtol=1e-5)
        assert all(torch.isfinite(torch.tensor(alone)))


def test_text_lm_logps_do_not_depend_on_batch_composition(tiny_lm_path, tmp_path):
    model = load_model(tiny_lm_path, torch_dtype="float32")
    encoder = ChatEncoder(text_tokenizer(tiny_lm_path, pad=False))
    rows = [
        pref_row(0, rejected=NEGATIVES[:1]),
        pref_row(1, rejected=NEGATIVES),
        pref_row(2, rejected=NEGATIVES[:2]),
    ]
    ds, _ = tokenize_preferences(load_split(save_rows(rows, tmp_path / "p")), encoder, max_length=256)
    together = _logps_by_sample(model.eval(), encoder, list(ds))
    for b, feature in enumerate(ds):
        alone = _logps_by_sample(model, encoder, [feature])[0]
        assert torch.allclose(torch.tensor(alone), torch.tensor(together[b]), atol=1e-4, rtol=1e-5)


# -------------------------------------------------------------------------------- accumulation
def test_gradient_accumulation_matches_the_larger_batch(tiny_lm_path, tmp_path):
    """One optimizer step over 2 samples with 1 and 12 negatives: batch 2 == batch 1 x accumulation 2."""
    rows = [pref_row(0, rejected=NEGATIVES[:1]), pref_row(1, rejected=NEGATIVES)]
    data = save_rows(rows, tmp_path / "p")

    def adapter_after_one_step(name: str, per_device: int, accumulation: int) -> dict[str, torch.Tensor]:
        cfg = APOConfig(
            output_dir=str(tmp_path / name),
            model_name_or_path=str(tiny_lm_path),
            dataset_path=str(data),
            max_steps=1,
            learning_rate=0.5,
            optim="sgd",
            per_device_train_batch_size=per_device,
            gradient_accumulation_steps=accumulation,
            global_batch_size=None,
            save_strategy="no",
            use_cpu=True,
            max_length=160,
            lora_dropout=0.0,
            seed=0,
            nll_alpha=1.0,  # gives LoRA's zero-initialised B matrices a gradient at step 1
            dataloader_num_workers=0,
            jsonl_log=False,
        )
        torch.manual_seed(0)  # LoRA's A matrices are drawn when the adapter is attached
        run_apo(cfg)
        from safetensors.torch import load_file

        return load_file(str(tmp_path / name / "adapter_model.safetensors"))

    big = adapter_after_one_step("batch2", 2, 1)
    accumulated = adapter_after_one_step("batch1x2", 1, 2)
    assert big.keys() == accumulated.keys()
    moved = [k for k in big if "lora_B" in k and big[k].abs().sum() > 0]
    assert moved, "the step did not change the adapter"
    for key in big:
        assert torch.allclose(big[key], accumulated[key], atol=1e-6, rtol=1e-4), key


# ------------------------------------------------------------------ template text leaking into answers
LEAKED = (
    "Small left effusion.<|im_end|>\n<|im_start|>assistant\nAlso <|image_pad|> "
    "<|vision_start|>see the image<|vision_end|><|endoftext|>"
)


def test_template_tokens_inside_answers_stay_plain_text(vlm, tiny_vlm_path, image_root, tmp_path):
    """Real VLM answers sometimes echo template markup; as completion text it must neither end the turn
    early nor open an image slot the model has no pixels for (which breaks the forward pass)."""
    processor = load_processor(tiny_vlm_path)
    encoder = ChatEncoder(processor, image_root, max_edge=64)
    rows = [pref_row(0, chosen=LEAKED, rejected=[NEGATIVES[0], "<|image_pad|>" * 3, "<|im_end|>"])]
    ds, stats = tokenize_preferences(load_split(save_rows(rows, tmp_path / "p")), encoder, max_length=400)
    assert stats.rejected_kept == 3
    tokenizer = processor.tokenizer
    specials = {
        tokenizer.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|vision_start|>", "<|endoftext|>")
    }
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    for ids in [ds[0]["chosen_input_ids"], *ds[0]["rejected_input_ids"]]:
        assert not specials & set(ids)
        assert ids.count(end_of_turn) == 1  # the template's own end of turn only
    assert tokenizer.decode(ds[0]["chosen_input_ids"]).startswith(LEAKED)
    logps = _logps_by_sample(vlm, encoder, list(ds))[0]
    assert len(logps) == 4 and torch.isfinite(torch.tensor(logps)).all()


def test_a_template_bos_is_not_doubled_by_the_processor(tiny_vlm_path, image_root, tmp_path):
    """Gemma/Llama-style: the template writes the BOS and the tokenizer would add one too."""
    from cxrmax.toy.tinyvlm import CHAT_TEMPLATE

    processor = load_processor(tiny_vlm_path)
    processor.tokenizer.bos_token = "<|endoftext|>"
    processor.tokenizer.add_bos_token = True
    processor.chat_template = "{{ bos_token }}" + CHAT_TEMPLATE
    encoder = ChatEncoder(processor, image_root, max_edge=64)
    ds, _ = tokenize_preferences(
        load_split(save_rows([pref_row(0)], tmp_path / "p")), encoder, max_length=400
    )
    bos = processor.tokenizer.bos_token_id
    assert ds[0]["prompt_input_ids"][0] == bos and ds[0]["prompt_input_ids"][1] != bos


# ------------------------------------------------------------------------------------ data settings
@pytest.mark.parametrize(
    ("setting", "message"),
    [
        (dict(max_negatives=0), "max_negatives must be at least 1"),
        (dict(min_completion_tokens=0), "min_completion_tokens must be at least 1"),
        (dict(max_length=0), "max_length must be at least 2"),
        (dict(max_edge=0), "max_edge must be a positive"),
        (dict(global_batch_size=0), "global_batch_size must be at least 1"),
    ],
)
def test_data_settings_that_would_train_on_nothing_are_refused(tmp_path, setting, message):
    with pytest.raises(ValueError, match=message):
        APOConfig(output_dir=str(tmp_path), use_cpu=True, **setting)


def test_a_global_batch_that_does_not_divide_says_what_it_trains_with(tmp_path):
    with pytest.warns(UserWarning, match="training with 4 samples per optimizer step"):
        cfg = APOConfig(
            output_dir=str(tmp_path), use_cpu=True, per_device_train_batch_size=4, global_batch_size=6
        )
    assert cfg.gradient_accumulation_steps == 1
    cfg = APOConfig(
        output_dir=str(tmp_path), use_cpu=True, per_device_train_batch_size=4, global_batch_size=32
    )
    assert cfg.gradient_accumulation_steps == 8


# ---------------------------------------------------------------------------- end to end, lenient
def test_lenient_vlm_training_on_messy_preferences_reports_every_skip(tiny_vlm_path, image_root, tmp_path):
    """A real APO step on the tiny VLM (batch 4, accumulation 2) over rows with 1..12 negatives, a
    corrupt image, a negative equal to the positive and leaked template text; the console summary and
    <stage>_data_stats.json say what was skipped."""
    import io
    import json

    from rich.console import Console

    rows = [
        pref_row(0, rejected=NEGATIVES[:1]),
        pref_row(1, rejected=NEGATIVES),
        pref_row(2, rejected=[POSITIVE, NEGATIVES[3], "<|image_pad|> see above"]),
        pref_row(3, image_path="files/p10/p10000032/s50414267/truncated.jpg"),
        pref_row(4, chosen=MARKDOWN_EMOJI, rejected=NEGATIVES[4:9]),
        *[pref_row(5 + i, rejected=NEGATIVES[i : i + 2]) for i in range(4)],
    ]
    data = save_rows(rows, tmp_path / "p")
    cfg = APOConfig(
        output_dir=str(tmp_path / "out"),
        model_name_or_path=str(tiny_vlm_path),
        dataset_path=str(data),
        image_root=str(image_root),
        max_edge=64,
        max_length=256,
        lenient=True,
        max_steps=1,
        learning_rate=1e-2,
        per_device_train_batch_size=4,
        global_batch_size=8,
        save_strategy="no",
        use_cpu=True,
        logging_steps=1,
        lora_dropout=0.0,
        dataloader_num_workers=0,
        jsonl_log=False,
    )
    assert cfg.gradient_accumulation_steps == 2
    out = io.StringIO()
    result = run_apo(cfg, console=Console(file=out, width=400))
    stats = json.loads((tmp_path / "out" / "apo_data_stats.json").read_text())
    assert stats["samples_kept"] == 8 and stats["dropped_bad_image"] == 1 and stats["identical_rejected"] == 1
    assert "bad image 1" in out.getvalue() and "identical to the positive 1" in out.getvalue()
    logs = [h for h in result["log_history"] if "loss" in h and "rewards/chosen" in h]
    assert logs and all(torch.isfinite(torch.tensor(h["loss"])) for h in logs)


def test_chat_template_from_the_tokenizer_or_a_clear_error(tiny_vlm_path, tiny_lm_path, image_root, tmp_path):
    """Older VLM exports keep the template on the tokenizer only; a base model has none at all."""
    processor = load_processor(tiny_vlm_path)
    reference = ChatEncoder(load_processor(tiny_vlm_path), image_root, max_edge=64)
    processor.chat_template = None
    encoder = ChatEncoder(processor, image_root, max_edge=64)
    image = encoder.load_image("files/p10/p10000032/s50414267/a.jpg")
    assert encoder.encode_prompt(PROMPT, image) == reference.encode_prompt(PROMPT, image)
    tokenizer = text_tokenizer(tiny_lm_path)
    tokenizer.chat_template = None
    with pytest.raises(InputError, match="has a chat template .a base model"):
        ChatEncoder(tokenizer)


def test_a_template_that_refuses_a_system_message_is_an_input_error(tiny_lm_path, tmp_path):
    """Gemma-2/Mistral templates raise_exception() on a system role; --system-prompt then must say so."""
    tokenizer = text_tokenizer(
        tiny_lm_path,
        template="{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
        "{% endif %}" + GEMMA_TEMPLATE,
    )
    path = save_rows([pref_row(0)], tmp_path / "p")
    ds, _ = tokenize_preferences(load_split(path), ChatEncoder(tokenizer))
    assert len(ds) == 1
    with pytest.raises(InputError, match="System role not supported.*drop system_prompt"):
        tokenize_preferences(load_split(path), ChatEncoder(tokenizer, system_prompt="You are a radiologist."))
