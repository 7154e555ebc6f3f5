"""The tiny Qwen2-VL built in code: tokenizer, processor, model, text-only variant, save/load."""

from __future__ import annotations

import json
import pickle

import pytest

torch = pytest.importorskip("torch")
from PIL import Image  # noqa: E402

from cxrmax.toy import tinyvlm  # noqa: E402

USER_MESSAGE = [
    {
        "role": "user",
        "content": [
            {"type": "image"},
            {"type": "text", "text": "Please explain the basis for the diagnosis of Pleural Effusion."},
        ],
    }
]


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory):
    return tinyvlm.build_tiny_vlm(tmp_path_factory.mktemp("tiny-vlm"), corpus=["blunted costophrenic sulcus"])


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory):
    return tinyvlm.build_tiny_vlm(tmp_path_factory.mktemp("tiny-lm"), text_only=True)


def _xray(size=(300, 400)):
    # A gradient rather than a flat image so that patches differ.
    image = Image.linear_gradient("L").resize(size)
    return image.convert("RGB")


def test_tokenizer_has_qwen2vl_special_tokens_and_radiology_words():
    tokenizer = tinyvlm.build_tokenizer()
    ids = [tokenizer.convert_tokens_to_ids(token) for token in tinyvlm.SPECIAL_TOKENS]
    assert len(set(ids)) == len(ids)
    assert tokenizer.unk_token_id not in ids and None not in ids
    # Each special token is one id, never split.
    for token in tinyvlm.SPECIAL_TOKENS:
        assert len(tokenizer(token, add_special_tokens=False).input_ids) == 1
    # Trained vocabulary: common report words are a single token (with the leading-space form).
    for word in (" pneumothorax", " effusion", " cardiomegaly"):
        assert len(tokenizer(word, add_special_tokens=False).input_ids) == 1, word
    text = "Small left pleural effusion; no pneumothorax. Heart size is normal."
    assert tokenizer.decode(tokenizer(text).input_ids) == text


def test_corpus_words_enter_the_vocabulary():
    word = " zygomycosis"
    plain = tinyvlm.build_tokenizer()
    trained = tinyvlm.build_tokenizer(corpus=["zygomycosis"] * 5 + ["zygomycosis suspected"] * 5)
    assert len(trained(word, add_special_tokens=False).input_ids) < len(
        plain(word, add_special_tokens=False).input_ids
    )


def test_chat_template_renders_qwen2vl_format(vlm_dir):
    _, processor = tinyvlm.load_tiny_vlm(vlm_dir)
    text = processor.apply_chat_template(USER_MESSAGE, add_generation_prompt=True, tokenize=False)
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>"
        "Please explain the basis for the diagnosis of Pleural Effusion.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    # OpenAI-style image_url parts render the same vision block; plain string content works too.
    openai_style = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]
    assert "<|vision_start|><|image_pad|><|vision_end|>" in processor.apply_chat_template(
        openai_style, tokenize=False
    )
    assert processor.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False).endswith(
        "<|im_start|>user\nhi<|im_end|>\n"
    )


def test_vlm_is_tiny_qwen2vl_and_expands_image_tokens(vlm_dir):
    model, processor = tinyvlm.load_tiny_vlm(vlm_dir)
    assert type(model).__name__ == "Qwen2VLForConditionalGeneration"
    assert type(processor).__name__ == "TinyQwen2VLProcessor"
    assert not hasattr(processor, "video_processor")
    n_params = sum(p.numel() for p in model.parameters())
    assert 100_000 < n_params < 400_000
    text = processor.apply_chat_template(USER_MESSAGE, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[text], images=[_xray()], return_tensors="pt")
    grid = inputs["image_grid_thw"][0]
    n_image_tokens = int((inputs["input_ids"][0] == model.config.image_token_id).sum())
    assert n_image_tokens == int(grid.prod()) // 4  # merge_size 2 x 2
    assert inputs["pixel_values"].shape[0] == int(grid.prod())
    with torch.no_grad():
        out = model(**inputs)
    assert out.logits.shape == (1, inputs["input_ids"].shape[1], model.config.text_config.vocab_size)
    assert torch.isfinite(out.logits).all()
    # The image matters: a different image gives different logits.
    other = processor(
        text=[text], images=[_xray().transpose(Image.Transpose.FLIP_TOP_BOTTOM)], return_tensors="pt"
    )
    with torch.no_grad():
        assert not torch.allclose(model(**other).logits, out.logits)


def test_generate_with_image_is_seed_deterministic(vlm_dir):
    model, processor = tinyvlm.load_tiny_vlm(vlm_dir)
    text = processor.apply_chat_template(USER_MESSAGE, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[text], images=[_xray()], return_tensors="pt")

    def sample(seed):
        torch.manual_seed(seed)
        out = model.generate(**inputs, max_new_tokens=8, do_sample=True, temperature=1.0)
        return out[0, inputs["input_ids"].shape[1] :].tolist()

    first = sample(1)
    assert 1 <= len(first) <= 8
    assert sample(1) == first


def test_save_load_round_trip_is_exact(vlm_dir, tmp_path):
    model, processor = tinyvlm.load_tiny_vlm(vlm_dir)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    again, processor2 = tinyvlm.load_tiny_vlm(tmp_path)
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    sentence = "Mild cardiomegaly with blunted costophrenic sulcus."
    assert processor2.tokenizer(sentence).input_ids == processor.tokenizer(sentence).input_ids
    assert processor2.chat_template == processor.chat_template
    assert processor2.tokenizer.padding_side == "left"
    # The processor pickles (multiprocessing data loaders need this).
    clone = pickle.loads(pickle.dumps(processor2))
    assert clone.tokenizer(sentence).input_ids == processor.tokenizer(sentence).input_ids


def test_build_is_deterministic_per_seed(tmp_path):
    a = tinyvlm.build_model(tinyvlm.build_tokenizer(), seed=3)
    b = tinyvlm.build_model(tinyvlm.build_tokenizer(), seed=3)
    c = tinyvlm.build_model(tinyvlm.build_tokenizer(), seed=4)
    weight = "model.language_model.embed_tokens.weight"
    assert torch.equal(a.state_dict()[weight], b.state_dict()[weight])
    assert not torch.equal(a.state_dict()[weight], c.state_dict()[weight])


def test_text_only_variant_shares_the_tokenizer(text_dir, vlm_dir):
    model, tokenizer = tinyvlm.load_tiny_vlm(text_dir)
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert tinyvlm.is_text_only(text_dir) and not tinyvlm.is_text_only(vlm_dir)
    assert json.loads((text_dir / "cxrmax_tiny.json").read_text())["kind"] == "text"
    reference = tinyvlm.build_tokenizer()
    sentence = "No acute cardiopulmonary process."
    assert tokenizer(sentence).input_ids == reference(sentence).input_ids
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": sentence}], add_generation_prompt=True
    )
    ids = torch.tensor([prompt if isinstance(prompt, list) else prompt["input_ids"]])
    out = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] > ids.shape[1]
