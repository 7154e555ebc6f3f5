"""cxrmax.core.hf.load_processor: the one processor loader of generation, training and the toy models."""

from __future__ import annotations

import ast
import json
import pickle
from pathlib import Path

from cxrmax.core.hf import adapter_base, load_processor

ROOT = Path(__file__).resolve().parents[2]


def test_a_qwen2_vl_gets_the_video_less_processor(tiny_vlm_path: Path) -> None:
    processor = load_processor(tiny_vlm_path)
    assert type(processor).__name__ == "TinyQwen2VLProcessor"
    assert hasattr(processor, "image_processor") and processor.tokenizer is not None
    # Picklable (multiprocessing data loaders): the class is importable from cxrmax.core.hf.
    assert type(pickle.loads(pickle.dumps(processor))).__name__ == "TinyQwen2VLProcessor"


def test_a_text_only_model_gets_its_tokenizer(tiny_lm_path: Path) -> None:
    tokenizer = load_processor(tiny_lm_path)
    assert not hasattr(tokenizer, "image_processor")
    assert tokenizer("pleural effusion")["input_ids"]


def test_an_adapter_folder_loads_its_base_models_processor(tiny_vlm_path: Path, tmp_path: Path) -> None:
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(tiny_vlm_path)}))
    assert adapter_base(adapter) == str(tiny_vlm_path)
    assert adapter_base(tiny_vlm_path) is None
    assert type(load_processor(adapter)).__name__ == "TinyQwen2VLProcessor"


def test_real_modules_do_not_import_toy_code() -> None:
    offenders = []
    for folder in ("cxrmax/core", "cxrmax/mimic", "cxrmax/generate", "apo_train"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                names = []
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module:
                    names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
                if any(name == "cxrmax.toy" or name.startswith("cxrmax.toy.") for name in names):
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not offenders, offenders


def test_load_model_merges_a_lora_adapter_onto_its_base(tiny_lm_path: Path, tmp_path: Path) -> None:
    import torch
    from peft import LoraConfig, get_peft_model

    from cxrmax.core.hf import load_model

    base = load_model(tiny_lm_path, torch_dtype="float32")
    torch.manual_seed(0)
    adapted = get_peft_model(base, LoraConfig(r=2, target_modules="all-linear", init_lora_weights=False))
    ids = torch.tensor([[1, 2, 3, 4]])
    expected = adapted(input_ids=ids).logits
    adapted.save_pretrained(tmp_path / "adapter")
    merged = load_model(tmp_path / "adapter", torch_dtype="float32")
    assert not hasattr(merged, "peft_config")  # merged, a plain transformers model
    assert torch.allclose(merged(input_ids=ids).logits, expected, atol=1e-5)


def test_a_model_that_is_nowhere_is_one_clear_error(tmp_path: Path) -> None:
    import pytest

    from cxrmax.core.errors import InputError
    from cxrmax.core.hf import load_model

    with pytest.raises(InputError, match="not found: no such local folder"):
        load_model(tmp_path / "nosuchmodel")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="not a model folder"):
        load_model(tmp_path / "empty")


def test_patch_embeddings_run_as_a_linear_layer_give_the_convolutions_output(tiny_vlm_path: Path) -> None:
    """load_model runs the Qwen2-VL patch embedding as a matrix product: the same output and weight
    gradient as the stock Conv3d, and the same state dict."""
    import torch
    from transformers import AutoModelForImageTextToText

    from cxrmax.core.hf import load_model

    fast = load_model(tiny_vlm_path).model.visual.patch_embed
    stock = AutoModelForImageTextToText.from_pretrained(tiny_vlm_path).model.visual.patch_embed
    assert "forward" in vars(fast) and "forward" not in vars(stock)
    assert all(
        torch.equal(a, b)
        for a, b in zip(fast.state_dict().values(), stock.state_dict().values(), strict=True)
    )
    flat = stock.in_channels * stock.temporal_patch_size * stock.patch_size**2
    pixels = torch.randn(37, flat, generator=torch.Generator().manual_seed(0))
    out_fast, out_stock = fast(pixels), stock(pixels)
    assert out_fast.shape == out_stock.shape == (37, stock.embed_dim)
    assert torch.allclose(out_fast, out_stock, atol=1e-5)
    out_fast.square().sum().backward()
    out_stock.square().sum().backward()
    assert torch.allclose(fast.proj.weight.grad, stock.proj.weight.grad, atol=1e-4)
