"""WiSE-FT: interpolate the starting and finetuned weights (backbone and classifier), pick the mixing weight on validation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from clipfuse.classify.metrics import save_figure


MAX_ALPHAS = 101  # each alpha re-encodes the validation images


def parse_alphas(text: str) -> list[float]:
    """``"0:1:0.1"`` (start:stop:step, stop included) or ``"0,0.5,1"`` -> list of floats in [0, 1]."""
    try:
        if ":" in text:
            start, stop, step = (float(v) for v in text.split(":"))
            if not (np.isfinite([start, stop, step]).all() and step > 0):
                raise ValueError
            if start > stop:
                raise ValueError(f"alphas {text!r} start above where they stop; write start:stop:step with "
                                 "start <= stop, e.g. 0:1:0.1.")
            count = (stop - start) / step + 1
            if not count <= MAX_ALPHAS:  # also catches an overflow to inf
                raise ValueError(f"alphas {text!r} make more than {MAX_ALPHAS} mixing weights; use at most "
                                 f"{MAX_ALPHAS} (e.g. 0:1:0.05).")
            alphas = list(np.round(np.arange(start, stop + step / 2, step), 6))
        else:
            alphas = [float(v) for v in text.split(",") if v.strip()]
    except ValueError as e:
        if str(e).startswith("alphas"):
            raise
        raise ValueError(f"alphas must look like 0:1:0.1 (start:stop:step) or 0,0.5,1; got {text!r}.") from None
    if not alphas or any(not 0 <= a <= 1 for a in alphas):  # NaN fails this too
        raise ValueError(f"alphas must lie in [0, 1]; got {text!r}.")
    if len(alphas) > MAX_ALPHAS:
        raise ValueError(f"alphas {text!r} are {len(alphas)} mixing weights; use at most {MAX_ALPHAS}.")
    return [float(a) for a in alphas]


def interpolate(zero_shot: dict, finetuned: dict, alpha: float) -> dict:
    """``(1 - alpha) * zero_shot + alpha * finetuned`` for every floating tensor.

    Written this way (not as ``lerp``) so that alpha 0 and 1 give back each end exactly.
    Non-floating tensors (counters, ids) come from the finetuned state.
    """
    if zero_shot.keys() != finetuned.keys():
        missing = sorted(set(zero_shot) ^ set(finetuned))[:3]
        raise ValueError(f"the two models have different parameters (e.g. {missing}); interpolate a model "
                         "with its own finetuned copy.")
    out = {}
    for k, z in zero_shot.items():
        f = finetuned[k]
        out[k] = (1.0 - alpha) * z + alpha * f if torch.is_floating_point(z) else f.clone()
    return out


def interpolate_head(start: dict, finetuned: dict, alpha: float) -> dict:
    """The classifier ``(1 - alpha) * start + alpha * finetuned`` (weight, and bias when linear);
    cosine classifiers (no bias) get unit rows."""
    out = {k: (1.0 - alpha) * start[k].float() + alpha * finetuned[k].float() for k in finetuned}
    if "bias" not in out:
        out["weight"] = F.normalize(out["weight"], dim=-1)
    return out


def head_logits(features: torch.Tensor, head: dict) -> torch.Tensor:
    """Logits of a saved classifier, up to its scale: cosine without a bias, linear with one
    (see :class:`clipfuse.train.finetune.ClassifierHead`)."""
    features = F.normalize(features.float(), dim=-1)
    if "bias" not in head:
        return features @ F.normalize(head["weight"].float(), dim=-1).T
    return features @ head["weight"].float().T + head["bias"].float()


def sweep(model, zero_shot_state: dict, finetuned_state: dict, start_head: dict, finetuned_head: dict,
          alphas: list[float], val_features, val_labels: torch.Tensor, *, progress=None) -> dict:
    """Validation accuracy of every alpha; loads the best one into ``model``.

    ``start_head`` and ``finetuned_head`` are ``{"weight": (n_classes, dim)[, "bias":
    (n_classes,)]}``: the zero-shot classifier of a CLIP model (no bias: cosine) or the
    linear probe of an image-only backbone, and the finetuned one. ``val_features(alpha,
    model)`` returns the (n_val, dim) image features of the validation images under the
    interpolated model (callers answer alpha 0 from the store's cached embeddings when
    the base model made them).

    Returns
    -------
    dict with ``alphas``, ``accuracies``, ``best_alpha``, ``best_accuracy`` and
    ``head`` (the interpolated classifier at the best alpha).
    """
    accuracies = []
    for i, alpha in enumerate(alphas):
        model.load_state_dict(interpolate(zero_shot_state, finetuned_state, alpha))
        head = interpolate_head(start_head, finetuned_head, alpha)
        feats = torch.as_tensor(val_features(alpha, model), dtype=torch.float32)
        logits = head_logits(feats, head)
        accuracies.append(float((logits.argmax(dim=1) == val_labels).float().mean()))
        if progress:
            progress(i + 1, len(alphas), alpha, accuracies[-1])
    best = int(np.argmax(accuracies))
    alpha = alphas[best]
    model.load_state_dict(interpolate(zero_shot_state, finetuned_state, alpha))
    return {"alphas": alphas, "accuracies": accuracies, "best_alpha": alpha, "best_accuracy": accuracies[best],
            "head": interpolate_head(start_head, finetuned_head, alpha)}


def plot_alpha_curve(alphas: list[float], accuracies: list[float], path: str | Path, *, best_alpha: float,
                     start_name: str = "zero-shot") -> Path:
    """Save validation accuracy against alpha as a PNG (alpha 0 = the start, 1 = finetuned)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    ax.plot(alphas, accuracies, marker="o")
    ax.axvline(best_alpha, color="grey", linestyle="--", label=f"best alpha = {best_alpha:g}")
    ax.set(xlabel=f"alpha (0 = {start_name}, 1 = finetuned)", ylabel="validation accuracy", title="WiSE-FT")
    ax.legend()
    return save_figure(fig, path)
