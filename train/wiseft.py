"""WiSE-FT: interpolate zero-shot and finetuned weights, pick the mixing weight on validation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from clipfuse.classify.metrics import save_figure


def parse_alphas(text: str) -> list[float]:
    """``"0:1:0.1"`` (start:stop:step, stop included) or ``"0,0.5,1"`` -> list of floats in [0, 1]."""
    try:
        if ":" in text:
            start, stop, step = (float(v) for v in text.split(":"))
            if step <= 0:
                raise ValueError
            alphas = list(np.round(np.arange(start, stop + step / 2, step), 6))
        else:
            alphas = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"alphas must look like 0:1:0.1 (start:stop:step) or 0,0.5,1; got {text!r}.") from None
    if not alphas or any(a < 0 or a > 1 for a in alphas):
        raise ValueError(f"alphas must lie in [0, 1]; got {text!r}.")
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


def sweep(model, zero_shot_state: dict, finetuned_state: dict, zero_shot_head: torch.Tensor,
          finetuned_head: torch.Tensor, alphas: list[float], val_features, val_labels: torch.Tensor,
          *, progress=None) -> dict:
    """Validation accuracy of every alpha; loads the best one into ``model``.

    ``val_features(alpha, model)`` returns the (n_val, dim) image features of the
    validation images under the interpolated model (callers answer alpha 0 from the
    store's cached embeddings when the base model made them).

    Returns
    -------
    dict with ``alphas``, ``accuracies``, ``best_alpha``, ``best_accuracy`` and
    ``head`` (the interpolated classifier at the best alpha).
    """
    accuracies = []
    for i, alpha in enumerate(alphas):
        model.load_state_dict(interpolate(zero_shot_state, finetuned_state, alpha))
        head = (1.0 - alpha) * zero_shot_head + alpha * finetuned_head
        feats = torch.as_tensor(val_features(alpha, model), dtype=torch.float32)
        logits = F.normalize(feats, dim=-1) @ F.normalize(head.float(), dim=-1).T
        accuracies.append(float((logits.argmax(dim=1) == val_labels).float().mean()))
        if progress:
            progress(i + 1, len(alphas), alpha, accuracies[-1])
    best = int(np.argmax(accuracies))
    alpha = alphas[best]
    model.load_state_dict(interpolate(zero_shot_state, finetuned_state, alpha))
    return {"alphas": alphas, "accuracies": accuracies, "best_alpha": alpha, "best_accuracy": accuracies[best],
            "head": F.normalize((1.0 - alpha) * zero_shot_head + alpha * finetuned_head, dim=-1)}


def plot_alpha_curve(alphas: list[float], accuracies: list[float], path: str | Path, *, best_alpha: float) -> Path:
    """Save validation accuracy against alpha as a PNG (alpha 0 = zero-shot, 1 = finetuned)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    ax.plot(alphas, accuracies, marker="o")
    ax.axvline(best_alpha, color="grey", linestyle="--", label=f"best alpha = {best_alpha:g}")
    ax.set(xlabel="alpha (0 = zero-shot, 1 = finetuned)", ylabel="validation accuracy", title="WiSE-FT")
    ax.legend()
    return save_figure(fig, path)
