"""APO and SFT on a tiny Qwen2-VL with real images from a mini MIMIC-CXR (cxrmax.mimic.images preprocessing)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from apo_train.data import (
    APOCollator,
    ChatEncoder,
    SFTCollator,
    load_split,
    tokenize_preferences,
    tokenize_sft,
)
from apo_train.modeling import load_model, load_processor
from apo_train.trainer import run_apo, run_sft, sft_loss
from cxrmax.core.errors import InputError
from cxrmax.core.schemas import PREFERENCE_SCHEMA, SFT_SCHEMA
from tests.helpers.training import POSITIVE, PROMPT, apo_config, preference_rows, save_dataset, sft_config


@pytest.fixture(scope="module")
def image_paths(mini_mimic) -> list[str]:
    paths = sorted(p.relative_to(mini_mimic).as_posix() for p in Path(mini_mimic, "files").rglob("*.jpg"))
    assert len(paths) >= 4
    return paths[:4]


@pytest.fixture(scope="module")
def vlm_prefs(tmp_path_factory, image_paths):
    rows = preference_rows(6, image_paths=image_paths)
    return save_dataset(rows, PREFERENCE_SCHEMA, tmp_path_factory.mktemp("vlm") / "preferences")


def test_vlm_rows_share_the_image_and_expand_image_tokens(tiny_vlm_path, mini_mimic, vlm_prefs):
    encoder = ChatEncoder(load_processor(tiny_vlm_path), image_root=mini_mimic, max_edge=112)
    ds, stats = tokenize_preferences(load_split(vlm_prefs), encoder, max_length=512)
    assert stats.samples_kept == 6
    batch = APOCollator(encoder)([ds[0], ds[1]])
    rows = batch["input_ids"].shape[0]
    image_token = encoder.processor.image_token_id
    merge = encoder.processor.image_processor.merge_size
    assert batch["image_grid_thw"].shape == (rows, 3)
    per_row_tokens = (batch["input_ids"] == image_token).sum(dim=1)
    expected = batch["image_grid_thw"].prod(dim=1) // (merge * merge)
    assert torch.equal(per_row_tokens, expected) and (per_row_tokens > 0).all()
    assert batch["pixel_values"].shape[0] == int(batch["image_grid_thw"].prod(dim=1).sum())
    # Image tokens are prompt tokens: never in the labels.
    assert not (batch["labels"] == image_token).any()


def test_jpeg_quality_trains_on_the_pixels_generate_serves(tiny_vlm_path, mini_mimic, image_paths, tmp_path):
    """With ``jpeg_quality`` the encoder's image is the preprocessed image after the JPEG round trip
    generate's image cache makes (so a student trains on the pixels it is later asked about)."""
    import io

    import numpy as np
    from PIL import Image

    from cxrmax.mimic.images import ImageCache, preprocess

    processor = load_processor(tiny_vlm_path)
    plain = ChatEncoder(processor, image_root=mini_mimic, max_edge=112)
    served = ChatEncoder(processor, image_root=mini_mimic, max_edge=112, jpeg_quality=90)
    path = image_paths[0]
    cache = ImageCache(tmp_path / "images", max_edge=112)  # generate's
    expected = np.asarray(Image.open(io.BytesIO(cache.jpeg(Path(mini_mimic) / path))).convert("RGB"))
    assert np.array_equal(np.asarray(served.load_image(path)), expected)
    decoded = np.asarray(preprocess(Path(mini_mimic) / path, max_edge=112).convert("RGB"))
    assert np.array_equal(np.asarray(plain.load_image(path)), decoded)
    assert not np.array_equal(decoded, expected)  # the round trip changes pixels: it matters


def test_the_image_cache_gives_the_same_batches_and_stays_bounded(
    tiny_vlm_path, mini_mimic, vlm_prefs, image_paths
):
    """``image_cache_size``: collated batches are exactly those of an encoder without a cache, the
    images are processed once while they stay cached, and no more than the size are kept (LRU)."""
    processor = load_processor(tiny_vlm_path)
    plain = ChatEncoder(processor, image_root=mini_mimic, max_edge=112, jpeg_quality=90)
    cached = ChatEncoder(processor, image_root=mini_mimic, max_edge=112, jpeg_quality=90, image_cache_size=2)
    ds, _ = tokenize_preferences(load_split(vlm_prefs), plain, max_length=512)
    for _ in range(2):
        a, b = APOCollator(plain)([ds[0], ds[1]]), APOCollator(cached)([ds[0], ds[1]])
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert 0 < len(cached._vision_cache) <= 2
    cached._vision_cache.clear()
    processed = []
    original = cached.vision_inputs
    cached.vision_inputs = lambda image: processed.append(1) or original(image)
    first = cached.image_inputs(image_paths[0])
    assert cached.image_inputs(image_paths[0]) is first and len(processed) == 1
    for path in image_paths[1:4]:
        cached.image_inputs(path)
    assert list(cached._vision_cache) == image_paths[2:4] and len(processed) == 4
    cached.image_inputs(image_paths[0])  # evicted: processed again
    assert len(processed) == 5
    with pytest.raises(InputError, match="image_cache_size"):
        ChatEncoder(processor, image_root=mini_mimic, image_cache_size=-1)


def test_sft_loss_through_the_kept_logits_is_the_models_own_loss(
    tiny_vlm_path, mini_mimic, image_paths, tmp_path
):
    """``sft_loss`` (the LM head from the batch's first label on) gives the loss and the gradients of
    the model's own loss over all positions, with and without the Trainer's token count, on rows
    whose prompts differ in length (images, text) and a padded batch."""
    rows = [
        {
            "sample_id": f"s{i}",
            "split": "train",
            "image_path": image_paths[i % len(image_paths)],
            "prompt": PROMPT.format(label="edema" + " and pleural effusion" * i),
            "completion": POSITIVE + " heart size normal" * (2 - i),
            "model": "m0",
        }
        for i in range(3)
    ]
    encoder = ChatEncoder(load_processor(tiny_vlm_path), image_root=mini_mimic, max_edge=112)
    ds, _ = tokenize_sft(
        load_split(save_dataset(rows, SFT_SCHEMA, tmp_path / "sft")), encoder, max_length=512
    )
    batch = SFTCollator(encoder)([ds[i] for i in range(3)])
    assert len({len(r) for r in ds["prompt_input_ids"]}) == 3
    model = load_model(tiny_vlm_path).train()

    def gradients(loss):
        model.zero_grad()
        loss.backward()
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    own = model(**batch).loss
    own_grads = gradients(own)
    mine, outputs = sft_loss(model, batch)
    assert outputs.logits.shape[1] < batch["input_ids"].shape[1]  # the head skipped prompt positions
    assert torch.allclose(mine, own, atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(gradients(mine), own_grads, strict=True))
    tokens = int((batch["labels"][:, 1:] != -100).sum())
    scaled, _ = sft_loss(model, batch, num_items_in_batch=torch.tensor(2 * tokens))
    assert torch.allclose(scaled, own / 2, atol=1e-5)


def test_rows_sharing_an_image_and_prompt_decode_the_film_once_and_tokenize_alike(
    tiny_vlm_path, mini_mimic, image_paths, tmp_path
):
    """An SFT split holds every model's answer to one image and prompt: tokenizing decodes each film
    once per (prompt, image) and gives each row exactly what a fresh encoder gives it alone."""
    rows = [
        {
            "sample_id": f"s{i}",
            "split": "train",
            "image_path": image_paths[i % 2],
            "prompt": PROMPT.format(label="edema" if i < 4 else "atelectasis"),
            "completion": f"{POSITIVE} {i}",
            "model": f"m{i}",
        }
        for i in range(6)
    ]
    processor = load_processor(tiny_vlm_path)
    encoder = ChatEncoder(processor, image_root=mini_mimic, max_edge=112)
    loads = []
    original = encoder.load_image
    encoder.load_image = lambda path, row=None: loads.append(path) or original(path, row)
    split = load_split(save_dataset(rows, SFT_SCHEMA, tmp_path / "sft"))
    ds, stats = tokenize_sft(split, encoder, max_length=512)
    assert stats.samples_kept == 6
    assert len(loads) == 4  # (edema, image 0), (edema, image 1), (atelectasis, image 0), (... image 1)
    for i in range(6):
        alone, _ = tokenize_sft(
            split.select([i]), ChatEncoder(processor, image_root=mini_mimic, max_edge=112)
        )
        assert alone[0]["prompt_input_ids"] == ds[i]["prompt_input_ids"]
        assert alone[0]["completion_input_ids"] == ds[i]["completion_input_ids"]


def test_missing_image_is_an_input_error(tiny_vlm_path, mini_mimic, tmp_path):
    from cxrmax.core.errors import InputError

    rows = preference_rows(2, image_paths=["files/p10/p10000000/s50000000/nope.jpg"])
    path = save_dataset(rows, PREFERENCE_SCHEMA, tmp_path / "p")
    encoder = ChatEncoder(load_processor(tiny_vlm_path), image_root=mini_mimic, max_edge=112)
    with pytest.raises(InputError, match=r"row 1 field 'image_path'"):
        tokenize_preferences(load_split(path), encoder)


@pytest.mark.slow
def test_apo_and_sft_train_on_tiny_qwen2_vl_with_images(
    tiny_vlm_path, mini_mimic, vlm_prefs, image_paths, tmp_path
):
    cfg = apo_config(
        tmp_path,
        tiny_vlm_path,
        vlm_prefs,
        image_root=str(mini_mimic),
        max_edge=112,
        max_length=512,
        max_steps=3,
        learning_rate=2e-2,
    )
    result = run_apo(cfg)
    logs = [h for h in result["log_history"] if "rewards/chosen" in h]
    assert len(logs) == 3
    assert logs[0]["rewards/chosen"] == pytest.approx(0.0, abs=1e-6)
    assert logs[-1]["loss"] < logs[0]["loss"]
    assert all(h["negatives"] >= 2 for h in logs)

    rows = [
        {
            "sample_id": f"s{i}",
            "split": "train",
            "image_path": image_paths[i % len(image_paths)],
            "prompt": PROMPT.format(label="effusion"),
            "completion": POSITIVE,
            "model": "m0",
        }
        for i in range(4)
    ]
    sft_path = save_dataset(rows, SFT_SCHEMA, tmp_path / "sft")
    sft = run_sft(
        sft_config(
            tmp_path / "sft_out",
            tiny_vlm_path,
            sft_path,
            image_root=str(mini_mimic),
            max_edge=112,
            max_steps=3,
            learning_rate=2e-2,
            per_device_train_batch_size=2,
            lora_dropout=0.0,
        )
    )
    losses = [h["loss"] for h in sft["log_history"] if "loss" in h]
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert (tmp_path / "sft_out" / "adapter_model.safetensors").exists()
