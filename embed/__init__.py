"""Run the model (CLIP, or an image-only timm backbone): load it, fingerprint it, embed images (and texts) as unit vectors.

Names, model-name parsing and the error types import no torch; the rest loads torch on first use.
"""

from __future__ import annotations

import importlib

from .names import (
    DEFAULT_MODEL,
    DEFAULT_PRETRAINED,
    EFFNET_LITE0,
    IMPORTED_PREFIX,
    TIMM_PREFIX,
    ModelName,
    PretrainedWeightsError,
    default_pretrained,
    is_image_only,
    parse_model_name,
)

_LAZY = {  # name -> module: these import torch (and open_clip/timm when a model is built)
    "ImageBackbone": "backbones", "load_weights_file": "checkpoints", "tensors_only": "checkpoints",
    "DEFAULT_MAX_PIXELS": "images", "ImageRecord": "images", "decode_image": "images", "read_image": "images",
    "to_rgb": "images", "Embedder": "model", "EmbedderConfig": "model", "ModelInfo": "model",
    "check_device": "model", "create_embedder": "model", "hash_state_dict": "model", "ImageBatch": "pipeline",
    "iter_image_batches": "pipeline", "DEFAULT_TEMPLATES": "prompts", "build_prompts": "prompts",
    "class_text_embeddings": "prompts",
}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DEFAULT_MODEL", "DEFAULT_PRETRAINED", "EFFNET_LITE0", "IMPORTED_PREFIX", "TIMM_PREFIX", "ModelName",
    "PretrainedWeightsError", "default_pretrained", "is_image_only", "parse_model_name", *_LAZY,
]
