"""Classifier heads and their fusion: numpy arrays in, class probabilities out."""

from clipfuse.classify.base import UNLABELED, create_head, get_head_class, list_heads, register_head
from clipfuse.classify.ensemble import (
    DEFAULT_HEADS,
    Ensemble,
    HeadsConfig,
    ViewRows,
    WeightedFusion,
    create_ensemble,
    create_ensemble_from_config,
    create_heads_from_config,
    head_proba,
    load_ensemble,
    save_ensemble,
)
from clipfuse.classify.graph import knn_graph
from clipfuse.classify.linear import FinetunedHead, HeadUnavailableError, LinearProbeHead, ZeroShotHead
from clipfuse.classify.metrics import (
    class_similarity,
    confused_pairs,
    expected_calibration_error,
    plot_class_similarity,
    plot_confusion,
    score_predictions,
)
from clipfuse.classify.neighbors import KMeansVoteHead, KnnCacheHead
from clipfuse.classify.ood import ood_scores
from clipfuse.classify.propagation import LabelPropagationHead
from clipfuse.classify.selftrain import MeanTeacherHead, PseudoLabelHead, select_pseudo_labels

__all__ = [
    "DEFAULT_HEADS", "UNLABELED", "Ensemble", "FinetunedHead", "HeadsConfig", "HeadUnavailableError", "KMeansVoteHead", "KnnCacheHead",
    "LabelPropagationHead", "LinearProbeHead", "MeanTeacherHead", "PseudoLabelHead",
    "ViewRows", "WeightedFusion", "ZeroShotHead", "class_similarity", "confused_pairs", "create_ensemble", "create_ensemble_from_config", "create_head", "create_heads_from_config",
    "expected_calibration_error", "get_head_class", "head_proba", "knn_graph", "list_heads",
    "load_ensemble", "ood_scores", "plot_class_similarity", "plot_confusion", "register_head",
    "save_ensemble", "score_predictions", "select_pseudo_labels",
]
