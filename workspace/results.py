"""What each workflow returns: typed results a notebook reads and the CLI prints."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from clipfuse.store import EmbeddingVersion, IndexSummary

Progress = Callable[[str, int, Optional[int]], None]
"""``progress(stage, done, total)``: a long step reports how far it is; ``total`` None when unknown."""


@dataclass(frozen=True)
class Notice:
    """Something the user should know that is not an error (a fallback taken, data skipped)."""

    message: str
    kind: str = "warning"  # 'warning', 'lock-wait' (another writer holds the store) or 'random-weights'


class OptionError(ValueError):
    """A value given for one option (a keyword of the API, a flag of the CLI) is wrong.

    ``option`` names it as the command line spells it (``--version``), so the CLI can
    point at it; the message says what was wrong and how to fix it.
    """

    def __init__(self, option: str, message: str):
        super().__init__(message)
        self.option = option


@dataclass
class _Result:
    notices: list[Notice] = field(default_factory=list, kw_only=True)  # warnings raised on the way

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class LabelChange:
    """One image's label before and after ``clipfuse label`` (None: no label)."""

    id: str
    path: str
    before: Optional[str]
    after: Optional[str]
    given: str  # how the image was named (its id or path)
    split: Optional[str] = None  # 'test' when the image is a test image only (its label scores, never trains)


@dataclass
class LabelResult(_Result):
    changes: list[LabelChange]
    new_classes: list[str]  # class names the labels added to the class list
    unchanged: int = 0  # rows that set a label the image already had by hand (no history row written)


@dataclass
class Suggestion:
    """An image to label next."""

    id: str
    path: str
    predicted: str  # the fused prediction now
    confidence: float
    priority: float  # uncertainty + 0.5 disagreement + 0.5 coverage
    reason: str


@dataclass
class SuggestResult(_Result):
    version: str
    suggestions: list[Suggestion]  # best first
    candidates: int  # unlabeled, non-test images considered

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("notices")
        return out


@dataclass
class Suspect:
    """A labeled image whose label is probably wrong."""

    id: str
    path: str
    given: str  # its label (as train-heads saw it)
    suggested: str  # the class the held-out predictions favour
    score: float  # 1 - p(given label), from heads that never saw this label
    flagged: bool  # cleanlab flags it as a label issue
    reason: str


@dataclass
class SuspectsResult(_Result):
    version: str
    suspects: list[Suspect]  # most suspect first
    flagged: int  # how many cleanlab flags in all
    judged: int  # labeled images judged
    conflicts: list[dict]  # one content or near-duplicates under two labels: ids, paths, labels, cosine
    leaks: list[dict]  # test images that duplicate labeled ones: test_id/path, labeled_id/path, cosine

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("notices")
        return out


@dataclass
class IndexResult(_Result):
    """What ``index`` and ``reembed`` did."""

    db: str
    summary: IndexSummary  # counts, errors, timing
    model: str  # the model that embedded
    random_weights: bool = False  # True only when asked for (allow_random_weights); results mean nothing
    skipped_folders: list[tuple[str, str]] = field(default_factory=list)  # (folder, reason) not entered
    missing_files: int = 0  # reembed: image rows with no file on disk, not re-embedded
    previous: Optional[str] = None  # reembed: the version the new one replaces as active

    @property
    def fingerprint(self) -> str:
        return self.summary.fingerprint


@dataclass(frozen=True)
class Neighbor:
    """One neighbour of a query."""

    rank: int
    id: str
    paths: list[str]  # every file with this content
    label: Optional[str]  # comma-joined when the content is filed under several
    split: Optional[str]
    similarity: float


@dataclass
class NeighborsResult(_Result):
    query: str  # how the query was understood: "text 'a cat'", "<path> (id ..., stored vector)", "id ..."
    version: str  # fingerprint searched
    neighbors: list[Neighbor]

    def to_dict(self) -> dict[str, Any]:
        return {"query": self.query, "version": self.version, "neighbors": [asdict(n) for n in self.neighbors]}


@dataclass
class InfoResult(_Result):
    uri: str
    tables: list[str]
    images: int  # image rows (files)
    unique_images: int  # distinct contents
    per_split: dict[str, int]
    per_class: dict[str, int]  # labeled images per class, in class order
    versions: list[EmbeddingVersion]
    active: Optional[str]
    errors: int
    duplicates: dict[str, int]  # duplicate rows per table (left by writers before the lock)
    error_list: Optional[list[dict]] = None  # path and reason of each, when asked for
    ensembles: list[dict] = field(default_factory=list)  # saved --versions ensembles: versions, fused accuracy
    labels_by_source: dict[str, int] = field(default_factory=dict)  # labeled images: folder, human, import

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("notices")
        if self.error_list is None:
            out.pop("error_list")
        return out


@dataclass
class ImportResult(_Result):
    db: str
    fingerprint: str
    rows: int  # vectors written
    dim: int
    images: int  # image rows written
    hashed: int  # ids computed from files readable here
    duplicate_ids: int = 0
    conflicting_ids: int = 0
    duplicate_paths: int = 0
    example: Optional[str] = None


@dataclass
class TrainResult(_Result):
    """Validation scores of every head and the fusion, as ``train_heads`` left them."""

    version: str
    folder: Path  # the heads folder (a link to the generation written)
    heads: list[str]  # fitted heads, in fusion order
    scores: dict[str, dict]  # head (and 'fused') -> accuracy, macro_f1, nll, ece, per_class_accuracy
    weights: dict[str, float]  # fusion weight per head
    fit_seconds: dict[str, float]
    unavailable: dict[str, str]  # head -> why it was skipped
    n_train: int  # labels the heads were scored with
    n_val: int  # held-out labels
    versions: list[str] = field(default_factory=list)  # a cross-version ensemble: its versions' fingerprints
    version_scores: dict[str, dict] = field(default_factory=dict)  # version short -> its heads fused alone
    missing: dict[str, int] = field(default_factory=dict)  # version short -> images it lacks
    fusion_rule: str = "weighted"  # weighted, best-head, average, graph-head (one label per class)

    @property
    def fused_accuracy(self) -> float:
        """Held-out accuracy of the fused predictions; NaN when no label could be held out."""
        return self.scores["fused"]["accuracy"] if "fused" in self.scores else float("nan")

    @property
    def best_head(self) -> str | None:
        """The head with the best held-out accuracy; None when no label could be held out."""
        scored = [h for h in self.heads if h in self.scores]
        return max(scored, key=lambda h: self.scores[h]["accuracy"]) if scored else None


@dataclass
class PredictResult(_Result):
    version: str
    table: str  # predictions table written
    images: int
    new_since_training: int  # images indexed after train_heads
    heads: list[str]
    mean_confidence: float
    per_head: bool  # whether per-head probability columns were written
    versions: list[str] = field(default_factory=list)  # a cross-version ensemble: its versions' fingerprints


@dataclass
class EvaluateResult(_Result):
    version: str
    out: Path
    classes: list[str]
    validation: dict[str, dict]  # head (and 'fused') -> scores on the held-out labels
    weights: dict[str, float]
    n_val: int
    val_counts: list[int]  # held-out labels per class
    test: Optional[dict] = None  # fused scores on labeled test images, when predicted
    n_test: int = 0
    files: list[Path] = field(default_factory=list)  # metrics.json, confusions.csv and the plots
    confusions: list[dict] = field(default_factory=list)  # most-confused class pairs on validation (names, paths)
    versions: list[str] = field(default_factory=list)  # a cross-version ensemble: its versions' fingerprints
    calibration: dict = field(default_factory=dict)  # temperature, ece_before, ece_after (fused, on validation)
    fusion: dict = field(default_factory=dict)  # rule (weighted, best-head, average, graph-head), rule_scores
    priors: dict = field(default_factory=dict)  # labels / pool: class -> proportion; total_variation; applied


@dataclass
class RemoveVersionResult(_Result):
    """What ``remove_version`` removed."""

    removed: EmbeddingVersion  # the version as it was (rows counted before removal)
    active: Optional[str]  # the active version afterwards, None when no complete version is left
    ensembles: list[str] = field(default_factory=list)  # saved cross-version ensembles that needed it

    @property
    def fingerprint(self) -> str:
        return self.removed.fingerprint


@dataclass
class ExportResult(_Result):
    path: Path
    rows: int
    split: str
    format: str
    missing: int  # images of the split with no prediction yet
    streamed: bool  # written into a stream (stdout, a FIFO) rather than a file
    threshold: Optional[float] = None  # confidence below which the abstain label was written
    abstained: int = 0  # rows given the abstain label (by either rule)
    threshold_coverage: Optional[float] = None  # with target_precision: share of validation kept at the threshold
    threshold_precision: Optional[float] = None  # and their accuracy
    abstained_confidence: int = 0  # rows below the confidence threshold
    ood_threshold: Optional[float] = None  # OOD score above which (ood_fraction: from which) rows abstained
    ood_fraction: Optional[float] = None  # the share of the most out-of-distribution rows asked for
    abstained_ood: int = 0  # rows the OOD rule gave the abstain label


@dataclass
class FinetuneResult(_Result):
    out: Path
    version: str  # the version finetuned from
    train_images: int
    pseudo_labels: int  # pseudo-labeled images added
    start_name: str  # 'zero-shot' or 'linear probe'
    start_accuracy: float
    best_accuracy: float
    best_epoch: int
    history: list[dict]  # per epoch: epoch, train_loss, val_accuracy, seconds


@dataclass
class WiseFtResult(_Result):
    out: Path
    alphas: list[float]
    accuracies: list[float]
    best_alpha: float
    best_accuracy: float
    start_name: str
    val_images: int
    curve: Path  # alpha_curve.png

    @property
    def start_accuracy(self) -> float:
        return self.accuracies[0] if self.alphas and self.alphas[0] == 0 else float("nan")


@dataclass
class DemoResult(_Result):
    workdir: Path
    db: Path
    model: str
    index: IndexResult
    query: str  # the unlabeled image whose neighbours were shown
    query_class: str
    neighbors: NeighborsResult  # the query itself left out
    neighbor_classes: list[str]  # class (label, else true class) of each neighbour
    training: list[TrainResult]  # one per version trained (two with finetune)
    unlabeled_accuracy: list[dict[str, float]]  # per training: head (and 'fused') -> accuracy on the unlabeled truth
    unlabeled_scored: int
    exported: ExportResult
    finetune: Optional[FinetuneResult] = None
    wise_ft: Optional[WiseFtResult] = None
    reembed: Optional[IndexResult] = None
    fallback: Optional[str] = None  # why the model asked for was replaced by effnet-lite0
