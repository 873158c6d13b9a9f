"""Finetune an image tower (CLIP's or an image-only backbone's) on the labeled images, interpolate
with WiSE-FT, and save models for re-embedding."""

from .checkpoint import (
    check_model_folder_target,
    load_state,
    model_config,
    model_name_of,
    read_model_folder,
    save_model_folder,
)
from .finetune import ClassifierHead, FinetuneConfig, FinetuneResult, encode, evaluate, finetune, fit_linear_probe
from .wiseft import head_logits, interpolate, interpolate_head, parse_alphas, plot_alpha_curve, sweep

__all__ = [
    "ClassifierHead", "check_model_folder_target", "FinetuneConfig", "FinetuneResult", "encode", "evaluate", "finetune", "fit_linear_probe", "head_logits",
    "interpolate", "interpolate_head", "load_state", "model_config", "model_name_of", "parse_alphas",
    "plot_alpha_curve", "read_model_folder", "save_model_folder", "sweep",
]
