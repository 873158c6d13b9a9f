"""Run the model (CLIP, or an image-only timm backbone): load it, fingerprint it, embed images (and texts) as unit vectors."""

from .backbones import EFFNET_LITE0, TIMM_PREFIX, ImageBackbone, is_image_only
from .checkpoints import load_weights_file, tensors_only
from .images import DEFAULT_MAX_PIXELS, ImageRecord, decode_image, read_image, to_rgb
from .model import (
    DEFAULT_MODEL,
    DEFAULT_PRETRAINED,
    Embedder,
    EmbedderConfig,
    ModelInfo,
    PretrainedWeightsError,
    check_device,
    create_embedder,
    default_pretrained,
    hash_state_dict,
)
from .pipeline import ImageBatch, iter_image_batches
from .prompts import DEFAULT_TEMPLATES, build_prompts, class_text_embeddings

__all__ = [
    "EFFNET_LITE0", "TIMM_PREFIX", "ImageBackbone", "is_image_only", "load_weights_file", "DEFAULT_MAX_PIXELS", "DEFAULT_MODEL", "DEFAULT_TEMPLATES", "DEFAULT_PRETRAINED", "Embedder", "EmbedderConfig", "ImageBatch",
    "ImageRecord", "ModelInfo", "PretrainedWeightsError", "create_embedder", "decode_image", "default_pretrained",
    "build_prompts", "class_text_embeddings", "tensors_only", "check_device", "hash_state_dict", "iter_image_batches", "read_image", "to_rgb",
]
