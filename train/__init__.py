"""Finetune CLIP on the labeled images, interpolate with WiSE-FT, and save models for re-embedding."""

from .checkpoint import load_state, model_config, read_model_folder, save_model_folder
from .finetune import FinetuneConfig, FinetuneResult, evaluate, finetune
from .wiseft import interpolate, parse_alphas, plot_alpha_curve, sweep

__all__ = [
    "FinetuneConfig", "FinetuneResult", "evaluate", "finetune", "interpolate", "load_state", "model_config",
    "parse_alphas", "plot_alpha_curve", "read_model_folder", "save_model_folder", "sweep",
]
