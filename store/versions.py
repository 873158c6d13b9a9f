"""Embedding versions as typed records: which model made a set of vectors, and what it can do."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from clipfuse.embed.names import ModelName, parse_model_name


@dataclass(frozen=True)
class EmbeddingVersion:
    """One embedding version of a store: the model that made its vectors and its table.

    Attributes mirror the store's ``versions`` table; ``rows`` is the number of vectors
    (None when it was not counted).
    """

    fingerprint: str  # 16 hex digits: model name + weights hash + preprocessing (+ precision, decoding)
    table: str  # LanceDB table of the vectors
    model: str  # clipfuse model name; 'imported:<what>' when vectors came without a model
    pretrained: str | None = None  # open_clip tag or weights file, None for schema names
    weights_hash: str | None = None
    preprocess: str | None = None
    dim: int = 0  # vector width
    random_weights: bool = False  # made with the seeded random model (a smoke test)
    source: str | None = None  # 'index' or 'import:<what>'
    created_at: float | None = None
    activated_at: float | None = None  # set when a complete run made it the active version
    rows: int | None = None  # vectors held
    precision: str = "fp32"  # of the model that made the vectors: 'fp32' (fp16 / bf16 autocast too) or 'int8'
    decode: str = "full"  # JPEG decoding: 'full', or 'draft' (large JPEGs at 1/2, 1/4 or 1/8 scale)

    @classmethod
    def from_row(cls, row: dict, rows: int | None = None) -> EmbeddingVersion:
        fields = {k: row.get(k) for k in cls.__dataclass_fields__ if k != "rows"}
        fields["random_weights"] = bool(fields["random_weights"])
        fields["dim"] = int(fields["dim"])
        fields["precision"] = fields["precision"] or "fp32"  # stores made before these were recorded
        fields["decode"] = fields["decode"] or "full"
        return cls(**fields, rows=rows if rows is not None else row.get("rows"))

    @property
    def short(self) -> str:
        """The first 12 hex digits, as commands print and take it."""
        return self.fingerprint[:12]

    @property
    def model_name(self) -> ModelName:
        return parse_model_name(self.model)

    @property
    def imported(self) -> bool:
        """Vectors imported without a model that loads here: nothing can be embedded for them."""
        return self.model_name.family == "imported"

    @property
    def image_only(self) -> bool:
        """Made by a backbone without a text tower (timm:..., effnet-lite0)."""
        return self.model_name.image_only

    @property
    def has_text_tower(self) -> bool:
        """Whether texts can be embedded for this version (a CLIP model that loads here)."""
        return not self.imported and not self.image_only

    @property
    def complete(self) -> bool:
        """Whether a run finished it (and made it active then; the store's active version is the one
        finished or activated last: ``Store.get_version()``)."""
        return self.activated_at is not None

    def with_rows(self, rows: int) -> EmbeddingVersion:
        return replace(self, rows=rows)

    def describe(self) -> str:
        """``3f2a9c0d1e5b (ViT-B-32, 1200 images)``; ``(ViT-B-32 int8, ...)`` for an int8 version"""
        model = self.model + (f" {self.precision}" if self.precision != "fp32" else "")
        return f"{self.short} ({model}" + (f", {self.rows} images)" if self.rows is not None else ")")

    def to_dict(self) -> dict:
        return asdict(self)
