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
