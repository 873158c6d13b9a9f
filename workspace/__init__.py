"""The application layer: every clipfuse workflow, once, over one store (``clipfuse.open``).

It joins data, embed, store, classify and train; none of them import it. The CLI (and later
faces: the review app, a cluster driver) only call it and show what it returns.
"""

from .demo import run_demo
from .crossversion import load_cross_trained
from .heads import Trained, load_trained, predictions_table
from .results import (
    DemoResult,
    EvaluateResult,
    ExportResult,
    FinetuneResult,
    ImportResult,
    IndexResult,
    InfoResult,
    LabelChange,
    LabelResult,
    Neighbor,
    NeighborsResult,
    Notice,
    OptionError,
    PredictResult,
    Progress,
    RemoveVersionResult,
    SuggestResult,
    Suggestion,
    Suspect,
    SuspectsResult,
    TrainResult,
    WiseFtResult,
)
from .workspace import EXPORT_FORMATS, EXPORT_SPLITS, Workspace, open

__all__ = [
    "DemoResult", "EXPORT_FORMATS", "EXPORT_SPLITS", "EvaluateResult", "ExportResult", "FinetuneResult",
    "ImportResult", "IndexResult", "InfoResult", "LabelChange", "LabelResult", "Neighbor", "NeighborsResult", "Notice", "OptionError",
    "PredictResult", "Progress", "RemoveVersionResult", "SuggestResult", "Suggestion", "Suspect", "SuspectsResult", "TrainResult", "Trained", "WiseFtResult", "Workspace", "load_cross_trained", "load_trained", "open",
    "predictions_table", "run_demo",
]
