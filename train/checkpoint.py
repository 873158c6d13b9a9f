"""Finetuned models as `local-dir:` folders (open_clip's for CLIP, timm's for image-only backbones) plus our metadata."""

from __future__ import annotations

import json
from pathlib import Path

import torch

MODEL_CONFIG = "open_clip_config.json"
MODEL_WEIGHTS = "open_clip_model.safetensors"
TIMM_WEIGHTS = "model.safetensors"  # timm's save_for_hf layout (+ config.json), loaded as timm.create_model("local-dir:...")
HEAD_WEIGHTS = "classifier.safetensors"
META = "clipfuse.json"
# every name a model folder may hold: open_clip's and timm's files, a Hugging Face tokenizer, the WiSE-FT curve
MODEL_FOLDER_FILES = frozenset({
    MODEL_CONFIG, MODEL_WEIGHTS, TIMM_WEIGHTS, HEAD_WEIGHTS, META, "config.json", "alpha_curve.png",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "vocab.txt", "merges.txt",
    "spiece.model", "sentencepiece.bpe.model", "added_tokens.json",
})


def model_config(model_name: str, model) -> dict | None:
    """``{"model_cfg": ..., "preprocess_cfg": ...}`` of an open_clip model, for a local-dir folder.

    None for an image-only backbone, whose folder timm describes itself.

    The architecture comes from the built-in config, the hub's ``open_clip_config.json`` or
    the local folder; the preprocessing (size, mean/std, interpolation, resize mode) from
    the loaded model's own ``visual.preprocess_cfg``, so the folder preprocesses exactly as
    the base model did.
    """
    import open_clip
    from open_clip import factory

    from clipfuse.embed import parse_model_name

    name = parse_model_name(model_name)
    if name.image_only:
        return None
    if name.schema == "local-dir":
        cfg = json.loads((name.folder / MODEL_CONFIG).read_text())
        model_cfg = cfg["model_cfg"]
    elif name.schema == "hf-hub":
        model_cfg = factory._get_hf_config(name.identifier)["model_cfg"]
    else:
        model_cfg = open_clip.get_model_config(model_name.replace("/", "-"))
        if model_cfg is None:
            raise ValueError(f"no open_clip config for model {model_name!r}.")
    preprocess_cfg = {k: list(v) if isinstance(v, tuple) else v
                      for k, v in dict(getattr(model.visual, "preprocess_cfg", {})).items()}
    return {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}


def save_model_folder(folder: str | Path, model: torch.nn.Module, config: dict | None, *,
                      heads: dict[str, dict] | None = None, meta: dict | None = None,
                      tokenizer=None) -> Path:
    """Write a model as a `local-dir:` folder (replacing ``folder`` as a whole).

    A CLIP model gets open_clip's layout (``config`` from :func:`model_config`), an
    image-only backbone timm's (``config.json`` + ``model.safetensors``, written by
    ``timm.models.save_for_hf``). ``heads`` maps a classifier name (``finetuned``,
    ``start``) to ``{"weight"[, "bias"]}``; they are stored flat in classifier.safetensors
    as ``name`` and ``name_bias``. Weights go to safetensors only; loading them never
    unpickles code.
    """
    from clipfuse.data import AtomicFolder

    check_model_folder_target(folder)
    return AtomicFolder(folder, owns=is_model_folder).replace(lambda staging: _write_model_folder(staging, model, config, heads, meta, tokenizer))


def is_model_folder(folder: str | Path) -> bool:
    """Whether ``folder`` holds a clipfuse model and nothing else."""
    folder = Path(folder)
    try:
        entries = [p.name for p in folder.iterdir()]
    except OSError:
        return False
    if any(name not in MODEL_FOLDER_FILES for name in entries):
        return False
    try:
        return json.loads((folder / META).read_text()).get("kind") in ("finetuned", "wise-ft")
    except (OSError, ValueError, AttributeError):
        return False


def check_model_folder_target(folder: str | Path) -> None:
    """Refuse to replace anything but a new or empty folder or an earlier clipfuse model folder.

    Raises
    ------
    FileExistsError
        ``folder`` is a file, or a folder holding other things (replacing it would delete them).
    """
    folder = Path(folder)
    if not folder.exists():
        return
    if not folder.is_dir():
        raise FileExistsError(f"{str(folder)!r} is a file; pass a folder for the model (a new or empty one).")
    entries = sorted(p.name for p in folder.iterdir())
    if not entries:
        return
    try:
        kind = json.loads((folder / META).read_text()).get("kind")
    except (OSError, ValueError, AttributeError):
        kind = None
    foreign = [name for name in entries if name not in MODEL_FOLDER_FILES]
    if kind not in ("finetuned", "wise-ft") or foreign:
        what = f"files a clipfuse model doesn't have ({', '.join(foreign[:5])})" if foreign else "no clipfuse model"
        raise FileExistsError(f"{str(folder)!r} holds {what}, and writing the model would replace the whole folder; "
                              "pass a new or empty folder.")


def _write_model_folder(staging: Path, model, config, heads, meta, tokenizer) -> None:
    from safetensors.torch import save_file

    from clipfuse.embed.backbones import ImageBackbone

    if isinstance(model, ImageBackbone):
        from timm.models import save_for_hf

        save_for_hf(model.trunk, str(staging), safe_serialization=True)
    else:
        (staging / MODEL_CONFIG).write_text(json.dumps(config, indent=2))
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(staging / MODEL_WEIGHTS))
    if heads:
        flat = {f"{name}{'' if part == 'weight' else '_' + part}": tensor
                for name, head in heads.items() for part, tensor in head.items()}
        save_file({k: v.detach().cpu().float().contiguous().clone() for k, v in flat.items()},
                  str(staging / HEAD_WEIGHTS))
    (staging / META).write_text(json.dumps(meta or {}, indent=2))
    hf_tokenizer = getattr(tokenizer, "tokenizer", None)  # open_clip's HFTokenizer wraps a transformers one
    if hasattr(hf_tokenizer, "save_pretrained"):
        hf_tokenizer.save_pretrained(str(staging))  # local-dir models with hf_tokenizer_name load it from here


def _is_timm_folder(folder: Path) -> bool:
    return (folder / TIMM_WEIGHTS).exists() and not (folder / MODEL_WEIGHTS).exists()


def model_name_of(folder: str | Path) -> str:
    """The ``--model`` name that loads a model folder: ``local-dir:/abs`` or ``timm:local-dir:/abs``."""
    folder = Path(folder).resolve()
    return f"timm:local-dir:{folder}" if _is_timm_folder(folder) else f"local-dir:{folder}"


def read_model_folder(folder: str | Path) -> tuple[dict, dict[str, dict]]:
    """The metadata and the classifiers of a model folder.

    The classifiers are ``finetuned`` and ``start`` (the zero-shot text classifier of a
    CLIP model, the linear probe of an image-only one), each ``{"weight"[, "bias"]}``; a
    bias means a linear layer, none a cosine classifier.
    """
    from safetensors.torch import load_file

    from clipfuse.data import leftover_folders

    folder = Path(folder)
    if not ((folder / MODEL_WEIGHTS).exists() or (folder / TIMM_WEIGHTS).exists()) or not (folder / META).exists():
        left = leftover_folders(folder)
        hint = (f" A run killed while replacing it left the previous model in {str(left[-1])!r}: rename that "
                "folder back." if left and not folder.exists() else "")
        raise FileNotFoundError(f"{str(folder)!r} is not a clipfuse model folder (no {MODEL_WEIGHTS} or "
                                f"{TIMM_WEIGHTS}, or no {META}); pass the folder `clipfuse finetune` or "
                                f"`clipfuse wise-ft` wrote.{hint}")
    flat = load_file(str(folder / HEAD_WEIGHTS)) if (folder / HEAD_WEIGHTS).exists() else {}
    meta = json.loads((folder / META).read_text())
    if "zero_shot" in flat:  # folders written before image-only backbones named the start "zero_shot"
        flat["start"] = flat.pop("zero_shot")
        meta.setdefault("start_accuracy", meta.get("zero_shot_accuracy"))
        meta.setdefault("start", "zero-shot")
    heads = {name: {"weight": tensor, **({"bias": flat[f"{name}_bias"]} if f"{name}_bias" in flat else {})}
             for name, tensor in flat.items() if not name.endswith("_bias")}
    return meta, heads


def load_state(folder: str | Path) -> dict[str, torch.Tensor]:
    """The model weights of a model folder, under the names of the loaded model's ``state_dict``."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if _is_timm_folder(folder):
        return {f"trunk.{k}": v for k, v in load_file(str(folder / TIMM_WEIGHTS)).items()}  # see ImageBackbone
    return load_file(str(folder / MODEL_WEIGHTS))
