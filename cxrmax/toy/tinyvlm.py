"""Tiny Qwen2-VL-style vision-language models built in code, offline, for tests and demos.

No model weights can be downloaded in the development and CI environments, so every code path that
loads a real VLM (the transformers backend, the test server, the trainers) is exercised on a model
built here: a byte-level BPE tokenizer trained on a built-in radiology vocabulary (plus an optional
corpus) carrying the Qwen2-VL special tokens and chat template, a Qwen2-VL processor without the video
processor (torchvision does not install beside the CPU torch), and a Qwen2VLForConditionalGeneration
with a config of about 200k parameters. ``text_only=True`` builds a Qwen2ForCausalLM with the same
tokenizer instead.

    path = build_tiny_vlm("tiny", corpus=["no acute cardiopulmonary process"])
    model, processor = load_tiny_vlm(path)

The model's answers are random text, but the shapes, token ids, chat template and image handling are
those of the real thing, so anything that works here works on Qwen2-VL checkpoints.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from cxrmax.core.hf import load_model, load_processor, qwen2_vl_processor_class
from cxrmax.core.pathologies import OBSERVATIONS

#: Special tokens of Qwen2-VL, in the order they get ids (right after the trained vocabulary).
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

#: Chat template in the Qwen2-VL format. Message content is a string or a list of parts of type
#: "text", "image" or "image_url" (OpenAI style); each image becomes a vision block whose
#: <|image_pad|> the processor expands to the image's number of merged patches.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}"
    "{{- message['content'] -}}"
    "{%- else -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' or part['type'] == 'image_url' -%}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif part['type'] == 'text' -%}"
    "{{- part['text'] -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- endif -%}"
)

#: Words a chest X-ray report or a rationale about one uses; trained into the tokenizer so that typical
#: text tokenizes into whole words, like a real model's vocabulary would.
RADIOLOGY_WORDS = """
the a an and or of in on at to with without no not is are was were be been there this that these
patient chest x-ray radiograph image dr film frontal lateral pa ap view portable upright supine
diagnosed diagnosis explain basis findings impression comparison indication technique examination
lung lungs left right bilateral upper lower middle lobe base bases apex apices hilum hila perihilar
heart cardiac size silhouette mediastinum mediastinal contour contours aortic knob trachea midline
pleural effusion effusions pneumothorax pneumonia consolidation atelectasis edema opacity opacities
cardiomegaly enlarged cardiomediastinum fracture rib ribs lesion nodule mass support devices tube
line catheter pacemaker leads sternotomy wires clips port tip terminates svc atrium stomach
interstitial vascular congestion markings prominence increased decreased unchanged stable improved
worsening new acute chronic mild moderate severe small large trace focal diffuse patchy streaky
likely possible probable suggest suggests suggestive consistent compatible concerning cannot exclude
excluded evidence seen visualized identified noted demonstrate demonstrates shows show appears
normal abnormal clear well expanded hyperinflated costophrenic angle angles blunting obscured
hemidiaphragm diaphragm elevated osseous structures intact degenerative changes spine soft tissue
findings support because due to may represent infection aspiration scarring volume loss
cardiopulmonary process interval since prior study compared previous
""".split()


def _training_words(corpus: Iterable[str]) -> list[str]:
    words = list(RADIOLOGY_WORDS)
    words += [name.lower() for name in OBSERVATIONS]
    words += list(corpus)
    return words


def build_tokenizer(corpus: Iterable[str] = (), vocab_size: int = 1024) -> Any:
    """Train a byte-level BPE tokenizer on the built-in radiology words plus ``corpus`` and wrap it as a
    PreTrainedTokenizerFast with the Qwen2-VL special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    words = _training_words(corpus)
    # Sentences with spaces so that the space-prefixed forms ("Ġlung") are learnt as well.
    lines = [" ".join(words[i : i + 12]) for i in range(0, len(words), 12)] + words
    backend.train_from_iterator(lines, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        padding_side="left",  # decoder-only generation pads on the left; training code may switch
        chat_template=CHAT_TEMPLATE,
        extra_special_tokens={
            "image_token": "<|image_pad|>",
            "video_token": "<|video_pad|>",
            "vision_start_token": "<|vision_start|>",
            "vision_end_token": "<|vision_end|>",
        },
    )
    return tokenizer


def processor_class() -> type:
    """The video-less Qwen2-VL processor class (`cxrmax.core.hf.qwen2_vl_processor_class`)."""
    return qwen2_vl_processor_class()


def __getattr__(name: str) -> Any:
    # Processors pickled before the class moved to cxrmax.core.hf name it here.
    if name == "TinyQwen2VLProcessor":
        return qwen2_vl_processor_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def build_processor(tokenizer: Any) -> Any:
    """A Qwen2-VL processor (PIL image processor, patch 14, merge 2) around ``tokenizer``."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    image_processor = Qwen2VLImageProcessorPil(
        patch_size=14,
        temporal_patch_size=2,
        merge_size=2,
        size={"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 16},
    )
    return processor_class()(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE
    )


def _token_ids(tokenizer: Any) -> dict[str, int]:
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS}
    return {
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
    }


def _text_config(tokenizer: Any) -> dict[str, Any]:
    ids = _token_ids(tokenizer)
    return {
        "vocab_size": len(tokenizer),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True,
        # head_dim = 64 / 4 = 16; the multimodal rope sections (t, h, w) must sum to head_dim / 2.
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        "bos_token_id": ids["bos_token_id"],
        "eos_token_id": ids["eos_token_id"],
        "pad_token_id": ids["pad_token_id"],
    }


def build_model(tokenizer: Any, seed: int = 0, text_only: bool = False) -> Any:
    """A randomly initialised tiny Qwen2-VL (or Qwen2 causal LM when ``text_only``) sized to ``tokenizer``."""
    import torch
    from transformers import (
        GenerationConfig,
        Qwen2Config,
        Qwen2ForCausalLM,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
    )

    torch.manual_seed(seed)
    ids = _token_ids(tokenizer)
    text = _text_config(tokenizer)
    if text_only:
        config = Qwen2Config(
            **{k: v for k, v in text.items() if k != "rope_parameters"},
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        )
        model = Qwen2ForCausalLM(config)
    else:
        config = Qwen2VLConfig(
            text_config=text,
            vision_config={
                "depth": 2,
                "embed_dim": 32,
                "hidden_size": 64,
                "num_heads": 2,
                "mlp_ratio": 2,
                "patch_size": 14,
                "spatial_merge_size": 2,
                "temporal_patch_size": 2,
                "in_channels": 3,
            },
            image_token_id=ids["image_token_id"],
            video_token_id=ids["video_token_id"],
            vision_start_token_id=ids["vision_start_token_id"],
            vision_end_token_id=ids["vision_end_token_id"],
            tie_word_embeddings=True,
        )
        model = Qwen2VLForConditionalGeneration(config)
    model.generation_config = GenerationConfig(
        bos_token_id=ids["bos_token_id"],
        eos_token_id=ids["eos_token_id"],
        pad_token_id=ids["pad_token_id"],
        do_sample=False,
    )
    model.eval()
    return model


def build_tiny_vlm(
    out_dir: str | Path, corpus: Iterable[str] = (), seed: int = 0, text_only: bool = False
) -> Path:
    """Build a tiny model with its tokenizer and processor and save them to ``out_dir``.

    ``corpus``: extra texts (reports, answers) the tokenizer is trained on besides the built-in radiology
    words. ``text_only``: save a Qwen2ForCausalLM (same tokenizer) instead of a Qwen2-VL model.
    Returns ``out_dir``; load it with :func:`load_tiny_vlm` or ``from_pretrained``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(corpus)
    model = build_model(tokenizer, seed=seed, text_only=text_only)
    model.save_pretrained(out)
    if text_only:
        tokenizer.save_pretrained(out)
    else:
        build_processor(tokenizer).save_pretrained(out)
    (out / "cxrmax_tiny.json").write_text(
        json.dumps({"kind": "text" if text_only else "vlm", "seed": seed, "builder": "cxrmax.toy.tinyvlm"})
        + "\n"
    )
    return out


def copy_tiny_vlm(source: str | Path, target: str | Path) -> Path:
    """The model saved at ``source`` (weights, config, tokenizer, processor) copied to ``target``, to
    be trained there from its weights. ``source`` may be a ``step-N`` checkpoint folder, which holds
    the weights only: the tokenizer and processor then come from the folder above it. Sub-folders
    (checkpoints) are not copied."""
    source, target = Path(source), Path(target)
    if not (source / "config.json").is_file():
        raise FileNotFoundError(f"{source}: no saved model (config.json) here")
    target.mkdir(parents=True, exist_ok=True)
    folders = [source.parent, source] if source.name.startswith("step-") else [source]
    for folder in folders:
        for file in folder.iterdir():
            if file.is_file():
                shutil.copy2(file, target / file.name)
    return target


def is_text_only(path: str | Path) -> bool:
    """True when the model saved at ``path`` has no vision tower (a causal LM)."""
    config = json.loads((Path(path) / "config.json").read_text())
    return "vision_config" not in config


def load_tiny_vlm(path: str | Path, device: str = "cpu") -> tuple[Any, Any]:
    """Load ``(model, processor)`` saved by :func:`build_tiny_vlm` (also works for real Qwen2-VL dirs).

    For a text-only model the second element is the tokenizer. The model is loaded by
    :func:`cxrmax.core.hf.load_model`, as for generation and training."""
    processor = load_processor(path)
    model = load_model(path)
    model.to(device)
    model.eval()
    return model, processor
