"""Create an embedder (an open_clip CLIP model or an image-only timm backbone): the only place that runs it."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from urllib.parse import urlparse

import numpy as np
import torch

from .names import (DECODES, DEFAULT_MODEL, PRECISIONS, PretrainedWeightsError, default_pretrained, is_image_only,
                    parse_model_name, version_precision)
from .checkpoints import tensors_only
from clipfuse.data import DEFAULT_MAX_FILE_BYTES

from .images import DEFAULT_MAX_PIXELS
from .int8 import int8_engine, quantize_int8
from .pipeline import iter_image_batches

RANDOM_WEIGHTS_SEED = 0  # random weights are seeded so that their fingerprint is stable


@dataclass(frozen=True)
class EmbedderConfig:
    """Everything that decides which model embeds the images, and how."""

    model: str = DEFAULT_MODEL  # open_clip name, 'hf-hub:org/repo', 'local-dir:/path', 'timm:<name>' or 'effnet-lite0'
    pretrained: str | None = None  # open_clip tag or weights file; None: the model's own (DEFAULT_PRETRAINED for
    #                                the default model, timm's hub weights, the weights bundled with effnet-lite0)
    device: str = "auto"  # 'auto' picks cuda when present, else cpu
    precision: str = "fp32"  # fp32 everywhere; fp16 / bf16 on GPU only; int8 on CPU only (a version of its own)
    decode: str = "full"  # 'draft': JPEGs much larger than the model's input decode at 1/2, 1/4 or 1/8 scale
    batch_size: int = 32  # images per forward pass
    workers: int | None = None  # decode/resize worker processes; None: 0 on CPU (threads between forward passes),
    #                             up to 8 on GPU
    allow_random_weights: bool = False  # continue with random weights when pretrained ones can't load
    random_weights: bool = False  # build the seeded random model without loading anything (smoke tests,
    #                               re-opening a version that was made with random weights)
    max_image_pixels: int | None = DEFAULT_MAX_PIXELS  # decompression-bomb limit per image
    max_file_bytes: int | None = DEFAULT_MAX_FILE_BYTES  # larger files are recorded as errors, not read
    cache_dir: str | None = None  # open_clip / hub download cache


@dataclass(frozen=True)
class ModelInfo:
    """Identity of the model that made a set of vectors, as recorded in the store."""

    model: str
    pretrained: str | None
    weights_hash: str
    preprocess: str
    dim: int
    random_weights: bool = False
    precision: str = "fp32"  # of the weights that ran: 'fp32' (fp16 / bf16 autocast too) or 'int8'
    decode: str = "full"  # how JPEGs were decoded: 'full' or 'draft' (reduced-size DCT decoding)
    fingerprint: str = field(init=False)

    def __post_init__(self):
        parts = [self.model, self.weights_hash, self.preprocess]
        # Components added later enter only when they differ from what every earlier version did, so the
        # fingerprints of existing stores stay as they were.
        if self.precision != "fp32":
            parts.append(f"precision:{self.precision}")
        if self.decode != "full":
            parts.append(f"decode:{self.decode}")
        object.__setattr__(self, "fingerprint", hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16])

    def to_dict(self) -> dict:
        return asdict(self)


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"unknown device {device!r}; use 'auto', 'cpu', 'cuda' or 'cuda:N'.") from e
    if resolved.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r} is not supported; use 'auto', 'cpu', 'cuda' or 'cuda:N'.")
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but CUDA is not available here; use --device cpu.")
    if resolved.type == "cuda" and resolved.index is not None and resolved.index >= torch.cuda.device_count():
        raise ValueError(f"device {device!r} asked for, but this machine has {torch.cuda.device_count()} GPU(s); "
                         f"use cuda:0 to cuda:{torch.cuda.device_count() - 1}.")
    return resolved




def check_device(device: str, precision: str = "fp32") -> torch.device:
    """The torch device a ``--device`` / ``--precision`` pair runs on.

    ``auto`` with int8 is the CPU: int8 runs there only.

    Raises
    ------
    ValueError
        For an unknown device, CUDA asked for where there is none, an unknown precision,
        fp16 / bf16 off a GPU, or int8 on a GPU or on a CPU torch has no int8 kernels for;
        the message says what to pass instead.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be fp32, fp16, bf16 or int8, got {precision!r}.")
    if precision == "int8":
        resolved = torch.device("cpu") if device == "auto" else _resolve_device(device)
        if resolved.type != "cpu":
            raise ValueError(f"precision 'int8' runs on the CPU only (torch's int8 kernels), and device {device!r} "
                             "is a GPU; use --device cpu, or --precision fp16 / bf16 on the GPU.")
        int8_engine()
        return resolved
    resolved = _resolve_device(device)
    if precision != "fp32" and resolved.type != "cuda":
        raise ValueError(f"precision {precision!r} needs a GPU; use --precision fp32 or int8 on CPU.")
    return resolved


def hash_state_dict(state_dict: dict[str, torch.Tensor]) -> str:
    """Hash of a model's weights: names, dtypes, shapes and raw bytes of every tensor."""
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _describe_weights_error(config: EmbedderConfig, err: Exception) -> str:
    has_schema = parse_model_name(config.model).schema is not None
    pretrained = _resolved_pretrained(config)
    what = f"model {config.model!r}" + ("" if has_schema or pretrained is None else f" (pretrained={pretrained!r})")
    if is_image_only(config.model):
        ways = ("pass a weights file with --pretrained /path/to/model.safetensors, use --model effnet-lite0 "
                "(ImageNet weights that ship with clipfuse), or, for a smoke test only, --allow-random-weights.")
    else:
        ways = ("pass a local checkpoint with --pretrained /path/to/weights.safetensors, point --model at a folder "
                "holding open_clip_config.json and weights with --model local-dir:/path/to/model, use the "
                "image-only --model effnet-lite0, or, for a smoke test only, --allow-random-weights.")
    return f"could not load pretrained weights for {what}: {err}\nWays out: {ways}"


def _host_reachable(url: str, timeout: float = 3.0) -> bool:
    parsed = urlparse(url)
    try:
        socket.create_connection((parsed.hostname, parsed.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


@contextmanager
def _hub_offline_when_unreachable():
    """Use only the local hub cache when the hub can't be reached.

    Without this, every missing file costs ~25 s of download retries before failing.
    """
    try:
        from huggingface_hub import constants
    except ImportError:
        yield
        return
    if constants.is_offline_mode() or _host_reachable(constants.ENDPOINT):
        yield
        return
    previous, constants.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE, True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = previous


def _create_open_clip(config: EmbedderConfig, device: torch.device):
    import open_clip

    kwargs = dict(device=device, precision="fp32" if config.precision == "int8" else config.precision,
                  cache_dir=config.cache_dir)
    name = parse_model_name(config.model)
    has_schema = name.schema is not None
    if not has_schema and config.model.replace("/", "-") not in open_clip.list_models():
        raise ValueError(f"unknown open_clip model {config.model!r}; use a built-in name such as ViT-B-32 "
                         "(see open_clip.list_models()), hf-hub:org/repo, local-dir:/path/to/model, or an "
                         "image-only backbone: timm:<name> or effnet-lite0.")
    folder = name.folder
    if folder is not None:
        if (folder / "config.json").is_file() and not (folder / "open_clip_config.json").is_file():
            raise FileNotFoundError(f"{str(folder)!r} holds a timm model (config.json), not an open_clip one; "
                                    f"pass --model timm:local-dir:{folder}")
    pretrained = None if has_schema else _resolved_pretrained(config)
    if not config.random_weights:
        if pretrained is None and not has_schema and not config.allow_random_weights:
            tags = open_clip.list_pretrained_tags_by_model(config.model.replace("/", "-"))
            raise PretrainedWeightsError(_describe_weights_error(config, ValueError(
                f"no pretrained weights given; its tags are {', '.join(tags) or 'none'}")))
        try:
            with _hub_offline_when_unreachable(), tensors_only():  # every checkpoint is read as tensors only
                model, _, preprocess = open_clip.create_model_and_transforms(
                    config.model, pretrained=pretrained, require_pretrained=True, **kwargs
                )
            return model, preprocess, False
        except Exception as e:  # offline hub, bad tag, missing file, corrupt checkpoint...
            if isinstance(e, FileNotFoundError) and has_schema:
                raise FileNotFoundError(f"model folder for {config.model!r} not found: {e}") from e
            _fall_back_to_random(config, e)
    torch.manual_seed(RANDOM_WEIGHTS_SEED)
    model, _, preprocess = open_clip.create_model_and_transforms(
        config.model, pretrained=None, load_weights=False, **kwargs
    )
    return model, preprocess, True


def _resolved_pretrained(config: EmbedderConfig) -> str | None:
    """The weights a config loads: its own --pretrained, else the open_clip default tag
    (image-only backbones: None means the model's own weights); None for random weights."""
    if config.random_weights:
        return None
    if config.pretrained is None and not is_image_only(config.model):
        return default_pretrained(config.model)
    return config.pretrained


def _fall_back_to_random(config: EmbedderConfig, err: Exception) -> None:
    """After pretrained weights failed to load: raise, or warn loudly when random weights are allowed."""
    if not config.allow_random_weights:
        raise PretrainedWeightsError(_describe_weights_error(config, err)) from err
    warnings.warn(f"RANDOM WEIGHTS: pretrained weights for {config.model!r} could not be loaded ({err}); "
                  "continuing with seeded random weights as asked. Results are a smoke test only.", stacklevel=4)


def _create_image_backbone(config: EmbedderConfig, device: torch.device):
    """A timm backbone (``timm:<name>``, ``effnet-lite0``) with timm's preprocessing for its weights."""
    from .backbones import ImageBackbone, check_model_name, create_random_trunk, create_timm_trunk, timm_transform

    check_model_name(config.model, config.pretrained)
    if not config.random_weights:
        try:
            with _hub_offline_when_unreachable(), tensors_only():
                trunk = create_timm_trunk(config.model, config.pretrained, cache_dir=config.cache_dir)
            return ImageBackbone(trunk).to(device), timm_transform(trunk), False
        except Exception as e:  # offline hub, missing file, weights of another architecture...
            _fall_back_to_random(config, e)
    torch.manual_seed(RANDOM_WEIGHTS_SEED)
    trunk = create_random_trunk(config.model)
    return ImageBackbone(trunk).to(device), timm_transform(trunk), True


class Embedder:
    """A loaded model that turns images (and, for CLIP models, texts) into unit vectors.

    Build it with :func:`create_embedder`. Outputs are float32 arrays of shape
    ``(n, dim)`` with unit L2 norm, ready for cosine search by dot product.
    """

    def __init__(self, config: EmbedderConfig, model, preprocess, tokenizer, device: torch.device, info: ModelInfo):
        self.config = config
        self.model = model
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.device = device
        self.info = info

    @property
    def fingerprint(self) -> str:
        return self.info.fingerprint

    @property
    def dim(self) -> int:
        return self.info.dim

    @property
    def has_text(self) -> bool:
        """Whether the model has a text tower (CLIP) or is image-only."""
        return self.tokenizer is not None and hasattr(self.model, "encode_text")

    @property
    def image_size(self) -> tuple[int, int]:
        return _image_size(self.model)

    @property
    def workers(self) -> int:
        if self.config.workers is not None:
            return self.config.workers
        return min(8, os.cpu_count() or 1) if self.device.type == "cuda" else 0

    @property
    def decode_threads(self) -> int:
        """Threads that read a batch between forward passes when there are no worker processes: every core
        (torch's own threads are idle meanwhile)."""
        return max(1, torch.get_num_threads()) if self.workers == 0 else 1

    @property
    def draft_size(self) -> int | None:
        """Shortest side a JPEG must keep when decoded at reduced size (None: decoded in full).

        The largest size the preprocessing resizes to (256 for a 224 crop at crop_pct 0.875), so
        the reduced image is never smaller than what the model's resize makes of it.
        """
        if self.config.decode != "draft":
            return None
        return max([*_resize_sizes(self.preprocess), *self.image_size])

    def iter_batches(self, paths: list[str], *, storage_options: dict | None = None):
        """Read and preprocess files (or objects: ``s3://...``, read with ``storage_options``) in worker
        processes; yield :class:`ImageBatch` es in order."""
        return iter_image_batches(paths, self.preprocess, batch_size=self.config.batch_size,
                                  workers=self.workers if paths else 0, max_pixels=self.config.max_image_pixels,
                                  max_bytes=self.config.max_file_bytes,
                                  pin_memory=self.device.type == "cuda", storage_options=storage_options,
                                  draft_size=self.draft_size, threads=self.decode_threads)

    def read_image(self, path: str, *, storage_options: dict | None = None):
        """``(record, image)`` of one file, decoded the way this model's version decodes (see :func:`read_image`)."""
        from .images import read_image

        return read_image(path, max_pixels=self.config.max_image_pixels, max_bytes=self.config.max_file_bytes,
                          storage_options=storage_options, draft_size=self.draft_size)

    def _autocast(self):
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.config.precision)
        if dtype is None or self.device.type != "cuda":
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=dtype)

    @torch.no_grad()
    def encode_pixels(self, pixels: torch.Tensor) -> np.ndarray:
        """Embed a batch of preprocessed images.

        Parameters
        ----------
        pixels : Tensor of shape (n, 3, H, W)
            Output of ``self.preprocess`` stacked along the first axis.

        Returns
        -------
        ndarray of shape (n, dim), float32, unit rows.
        """
        if len(pixels) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        with self._autocast():
            feats = self.model.encode_image(pixels.to(self.device, non_blocking=True))
        return _normalize(feats)

    def encode_images(self, images) -> np.ndarray:
        """Embed PIL images (already RGB), in batches of ``config.batch_size``."""
        out = [np.zeros((0, self.dim), dtype=np.float32)]
        for start in range(0, len(images), self.config.batch_size):
            chunk = images[start:start + self.config.batch_size]
            out.append(self.encode_pixels(torch.stack([self.preprocess(im) for im in chunk])))
        return np.concatenate(out)

    @torch.no_grad()
    def encode_texts(self, texts: list[str]) -> np.ndarray:
        """Embed texts with the model's text tower.

        Returns
        -------
        ndarray of shape (len(texts), dim), float32, unit rows.
        """
        if not self.has_text:
            raise ValueError(f"model {self.config.model!r} has no text tower; text queries and zero-shot need "
                             "a CLIP model.")
        out = [np.zeros((0, self.dim), dtype=np.float32)]
        for start in range(0, len(texts), 256):
            tokens = self.tokenizer(list(texts[start:start + 256])).to(self.device)
            with self._autocast():
                out.append(_normalize(self.model.encode_text(tokens)))
        return np.concatenate(out)


def _resize_sizes(preprocess) -> list[int]:
    """Sizes the ``Resize`` steps of a torchvision preprocessing resize to (none found: [])."""
    sizes = []
    for t in getattr(preprocess, "transforms", []):
        size = getattr(t, "size", None)
        if "Resize" in type(t).__name__ and size is not None:
            sizes += [int(v) for v in (size if isinstance(size, (tuple, list)) else [size])]
    return sizes


def _image_size(model) -> tuple[int, int]:
    """Input (height, width) of an image-only backbone or of a CLIP model's image tower."""
    size = getattr(model, "image_size", None) or getattr(model.visual, "image_size", 224)
    return tuple(size) if isinstance(size, (tuple, list)) else (size, size)


def _normalize(feats: torch.Tensor) -> np.ndarray:
    feats = feats.float()
    feats = feats / feats.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return feats.cpu().numpy().astype(np.float32, copy=False)


def create_embedder(config: EmbedderConfig | None = None) -> Embedder:
    """Load the model a config names and fingerprint it.

    Raises
    ------
    PretrainedWeightsError
        When pretrained weights cannot be loaded and ``config.allow_random_weights``
        is False. The message names the model and the ways out.
    ValueError
        For an unusable device or precision.
    """
    import open_clip

    config = config or EmbedderConfig()
    if config.batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {config.batch_size}.")
    if config.decode not in DECODES:
        raise ValueError(f"decode must be full or draft, got {config.decode!r}.")
    device = check_device(config.device, config.precision)
    if is_image_only(config.model):
        model, preprocess, random_weights = _create_image_backbone(config, device)
        tokenizer = None
    else:
        model, preprocess, random_weights = _create_open_clip(config, device)
        try:
            tokenizer = open_clip.get_tokenizer(config.model, cache_dir=config.cache_dir)
        except Exception:  # image-only configs or tokenizers that need a hub download
            tokenizer = None
    model.eval()
    weights_hash = hash_state_dict(model.state_dict())  # of the weights loaded: int8 is recorded as precision
    if config.precision == "int8":
        model = quantize_int8(model, config.model)
    try:
        with torch.no_grad():
            probe = model.encode_image(torch.zeros(1, 3, *_image_size(model), device=device))
    except (TypeError, RuntimeError, AttributeError) as e:
        if config.precision != "int8":
            raise
        raise ValueError(f"--precision int8 does not work for {config.model}: a layer of it reads int8 weights as "
                         f"fp32 ({type(e).__name__}: {e}). Use --precision fp32 for it.") from e
    if not torch.isfinite(probe).all():
        raise ValueError(f"model {config.model!r} turns an image into NaN or infinite values: its weights are broken "
                         "(e.g. a WiSE-FT mix of NaN). Load other weights.")
    dim = probe.shape[-1]
    info = ModelInfo(
        model=config.model,
        pretrained=None if random_weights or parse_model_name(config.model).schema is not None
        else _resolved_pretrained(config),
        weights_hash=weights_hash,
        preprocess=repr(preprocess),
        dim=int(dim),
        random_weights=random_weights,
        precision=version_precision(config.precision),
        decode=config.decode,
    )
    return Embedder(config, model, preprocess, tokenizer, device, info)
