"""A vision-language model given rows with images but no image root trains on text only, and says so."""

from __future__ import annotations

import io

import datasets
from rich.console import Console

from apo_train.config import SFTStageConfig
from apo_train.modeling import load_processor
from apo_train.trainer import _encoder


def _rows(image: str | None) -> datasets.Dataset:
    return datasets.Dataset.from_list([{"prompt": "p", "completion": "c", "image_path": image}] * 2)


def test_vlm_without_image_root_warns(tiny_vlm_path, tiny_lm_path, tmp_path):
    cfg = SFTStageConfig(output_dir=str(tmp_path), model_name_or_path=str(tiny_vlm_path))
    processor = load_processor(tiny_vlm_path)
    text = io.StringIO()
    console = Console(file=text, width=300)
    _encoder(cfg, processor, _rows("files/p10/x.jpg"), console)
    assert "vision-language model and 2 rows have an image" in text.getvalue()
    assert "--mimic-root" in text.getvalue()

    quiet = io.StringIO()
    _encoder(cfg, processor, _rows(None), Console(file=quiet))  # no images in the data: nothing to say
    cfg.image_root = str(tmp_path)
    _encoder(cfg, processor, _rows("files/p10/x.jpg"), Console(file=quiet))  # images used
    lm = SFTStageConfig(output_dir=str(tmp_path), model_name_or_path=str(tiny_lm_path))
    _encoder(lm, load_processor(tiny_lm_path), _rows("files/p10/x.jpg"), Console(file=quiet))  # text model
    assert quiet.getvalue() == ""
