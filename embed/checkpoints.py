"""Read model checkpoints without running code: safetensors, or torch files restricted to tensors."""

from __future__ import annotations

import contextlib
import functools
import threading
from pathlib import Path

import torch

_TORCH_LOAD = torch.load
_GUARD = threading.RLock()


def _load_tensors_only(f, map_location=None, pickle_module=None, *, weights_only=None, mmap=None, **kwargs):
    """``torch.load`` with ``weights_only=True`` whatever the caller or the environment asks.

    An explicit ``weights_only=True`` is the one setting that
    ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` can't override, and it refuses every pickled
    object that is not a tensor or a plain container: no code runs.
    """
    kwargs.pop("weights_only", None)
    if mmap is not None:
        kwargs["mmap"] = mmap
    return _TORCH_LOAD(f, map_location=map_location, weights_only=True, **kwargs)


@contextlib.contextmanager
def tensors_only():
    """Within the block, every ``torch.load`` (open_clip's, timm's, torch.hub's) reads tensors only.

    open_clip and timm retry a failed ``weights_only=True`` load without it, and
    ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` then unpickles whatever the file holds; while
    the block runs, that retry is refused too and the load fails with the reason.
    """
    with _GUARD:
        previous = torch.load
        torch.load = functools.wraps(_TORCH_LOAD)(_load_tensors_only)
        try:
            yield
        finally:
            torch.load = previous


def load_weights_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a safetensors file, or a torch file read with ``weights_only=True``.

    Checkpoints that wrap the state dict (``{"state_dict": ...}``, ``{"model": ...}``) and
    ``module.`` prefixes left by DataParallel are unwrapped.

    Raises
    ------
    FileNotFoundError
        No such file.
    ValueError
        The file is not a checkpoint of tensors (corrupt, or pickled objects that are not
        tensors, which are never unpickled).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"weights file {str(path)!r} does not exist; pass an existing .safetensors or "
                                ".pt/.pth file with --pretrained.")
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = _load_tensors_only(str(path), map_location="cpu")
    except Exception as e:  # corrupt file, pickled code that weights_only refuses, not a checkpoint at all
        raise ValueError(f"can't read weights from {str(path)!r}: {type(e).__name__}: {e}. Pass a safetensors file "
                         "or a torch state dict of tensors (code in pickles is never loaded).") from e
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{str(path)!r} does not hold a state dict of tensors; pass the model's weights.")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state
