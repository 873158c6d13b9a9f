"""The clipfuse command line: builds configs, calls the library, prints results. Nothing else."""

from __future__ import annotations

import csv
import dataclasses
import functools
import json
import logging
import math
import os
import re
import shutil
import time
import warnings
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.panel import Panel
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

app = typer.Typer(
    help="Few-label image classification over a store of CLIP (or image-only backbone) embeddings.\n\n"
    "Start with `clipfuse demo`, or `clipfuse index LABELED_DIR --unlabeled DIR`.",
    no_args_is_help=True,
    rich_markup_mode="markdown",
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()
err_console = Console(stderr=True)


class Precision(str, Enum):
    fp32 = "fp32"
    fp16 = "fp16"
    bf16 = "bf16"


class Split(str, Enum):
    labeled = "labeled"
    unlabeled = "unlabeled"
    test = "test"


# ---- shared options -------------------------------------------------------------------------
def _db_path(value) -> Path:
    """``--db``: a folder, or a ``file:`` URI of one (``file:///abs``, ``file://localhost/abs``)."""
    from urllib.parse import unquote, urlparse

    text = str(value)
    if not re.match(r"^[A-Za-z][A-Za-z0-9+.-]+:", text):
        return Path(text)
    uri = urlparse(text)
    if uri.scheme == "file" and uri.netloc in ("", "localhost") and uri.path.startswith("/"):
        return Path(unquote(uri.path))
    if uri.scheme == "file":
        raise typer.BadParameter(f"{text!r} names the host {uri.netloc!r}; a file URI for --db is "
                                 "file:///absolute/path (or file://localhost/absolute/path).")
    if uri.scheme == "memory":
        raise typer.BadParameter(f"{text!r}: in-memory stores live only inside one Python process (use "
                                 "clipfuse.store.Store('memory://')); --db takes a folder.")
    if "/" in text.split(":", 1)[1][:2] or uri.netloc:
        raise typer.BadParameter(f"{text!r} looks like a URI; --db takes a folder on this machine (object storage "
                                 "is not supported yet).")
    return Path(text)  # a folder that merely has a colon in its name


DbOpt = Annotated[Path, typer.Option("--db", parser=_db_path, help="LanceDB folder of the store (created on first "
                                     "index), or a file:/// URI of one.")]
ModelOpt = Annotated[Optional[str], typer.Option(
    "--model", help="CLIP (open_clip) model: a built-in name (ViT-B-32), `hf-hub:org/repo` or `local-dir:/path`; "
    "or an image-only backbone: `timm:<name>` (timm:resnet50.a1_in1k) or `effnet-lite0` (ImageNet weights "
    "bundled, works offline). Default: the store's model, else ViT-B-32.")]
PretrainedOpt = Annotated[Optional[str], typer.Option(
    "--pretrained", help="open_clip pretrained tag (laion2b_s34b_b79k) or a local weights file "
    "(.safetensors / .pt) for open_clip or timm: models; ignored for open_clip's hf-hub: and local-dir: models.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")]
PrecisionOpt = Annotated[Precision, typer.Option("--precision", help="fp32, or fp16 / bf16 on GPU.")]
BatchOpt = Annotated[int, typer.Option("--batch-size", min=1, help="Images per forward pass.")]
WorkersOpt = Annotated[Optional[int], typer.Option(
    "--workers", min=0, help="Decode/resize worker processes (default: 1 on CPU, up to 8 on GPU).")]
RandomOpt = Annotated[bool, typer.Option(
    "--allow-random-weights", help="If pretrained weights can't be loaded, continue with random ones "
    "(a smoke test: results mean nothing).")]
VersionOpt = Annotated[Optional[str], typer.Option(
    "--version", help="Embedding version (fingerprint or prefix, see `clipfuse info`); default the active one.")]


def _runtime_errors(func):
    """Turn library errors into a red one-line message and exit code 1 (usage errors stay 2)."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        from clipfuse.embed import PretrainedWeightsError

        try:
            return func(*args, **kwargs)
        except (ValueError, LookupError, OSError, PretrainedWeightsError) as e:
            message = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
            err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from e

    return wrapper


def _quiet_libraries() -> None:
    # open_clip and the hub client log through the root logger; their failures reach the
    # user as our own error messages instead.
    logging.getLogger().setLevel(logging.CRITICAL)
    for name in ("open_clip", "huggingface_hub", "timm"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


def _open_store(db: Path, *, must_exist: bool = True):
    """The store at ``--db``; writers that find it busy say who holds it, then wait."""
    from clipfuse.store import Store

    if db.exists() and not db.is_dir():
        raise typer.BadParameter(f"{str(db)!r} is a file; a store is a folder (e.g. clipfuse.lance).", param_hint="--db")
    if must_exist and not db.exists():
        raise FileNotFoundError(f"no store at {str(db)!r}; run `clipfuse index ... --db {db}` first, "
                                "or pass the right --db.")

    def waiting(holder: str) -> None:
        err_console.print(f"[yellow]the store {db} is being written by {holder}; waiting for it to finish "
                          "(Ctrl-C to stop) ...[/]", highlight=False, soft_wrap=True)

    return Store(db, on_lock_wait=waiting)


def _get_version(store, version: Optional[str]) -> dict:
    """The version ``--version`` names (a wrong one is a command-line mistake: exit 2), else the active one."""
    try:
        return store.get_version(version)
    except LookupError as e:
        if version is not None and store.versions():
            raise typer.BadParameter(str(e), param_hint="--version") from e
        raise


def _check_device(device: str, precision: str = "fp32") -> None:
    """Refuse a device or precision this machine can't run before anything is loaded (exit 2)."""
    from clipfuse.embed import check_device

    try:
        check_device(device, precision)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--device" if "device" in str(e) else "--precision") from e


def _print_skipped(skipped) -> None:
    for path, reason in skipped[:10]:
        err_console.print(f"[yellow]skipped {path}: {reason}[/]", highlight=False, soft_wrap=True)
    if len(skipped) > 10:
        err_console.print(f"[yellow]... and {len(skipped) - 10} more folders not entered[/]")


def _embedder_config(store, *, model, pretrained, device, precision, batch_size, workers, allow_random):
    """Config of the model to run: the one asked for, else the store's active one (or, after a first run
    was killed before it finished, the version it was writing), else the default."""
    from clipfuse.embed import DEFAULT_MODEL, EmbedderConfig

    random_weights = False
    if model is None and store is not None and not store.is_empty:
        try:
            active = store.get_version()
        except LookupError:
            active = (store.versions() or [None])[-1]  # none complete yet: resume the newest
        if active is not None and not active["model"].startswith("imported:"):
            model = active["model"]
            pretrained = pretrained or active["pretrained"]
            random_weights = bool(active["random_weights"]) and pretrained is None  # the same random model again
    return EmbedderConfig(model=model or DEFAULT_MODEL, pretrained=pretrained, device=device, precision=precision,
                          batch_size=batch_size, workers=workers, allow_random_weights=allow_random,
                          random_weights=random_weights)


def _load_embedder(config):
    from clipfuse.embed import create_embedder

    _quiet_libraries()
    with console.status(f"loading model {config.model} ..."), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        embedder = create_embedder(config)
    if embedder.info.random_weights:
        _random_weights_banner(config.model)
    return embedder


def _random_weights_banner(model: str) -> None:
    err_console.print(Panel(
        f"Pretrained weights for [bold]{model}[/] could not be loaded; running with RANDOM weights as asked.\n"
        "Neighbours and predictions are a smoke test only and mean nothing.\n"
        "For real results pass --pretrained /path/to/checkpoint or --model local-dir:/path/to/model, or use "
        "--model effnet-lite0 (ImageNet weights that install with clipfuse).",
        title="RANDOM WEIGHTS", border_style="bold red"))


class _RateColumn(ProgressColumn):
    def render(self, task) -> Text:
        return Text(f"{task.speed:,.1f} img/s" if task.speed else "-- img/s", style="progress.data.speed")


def _progress() -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), _RateColumn(),
                    TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=err_console)


def _run_index(store, embedder, folders, *, commit_every: int = 512):
    from clipfuse.store import IndexConfig, index_images

    _print_skipped(folders.skipped)
    with _progress() as progress:
        task = progress.add_task("indexing", total=len(folders.files))
        summary = index_images(store, embedder, folders.files, folders.classes, roots=folders.roots,
                               config=IndexConfig(commit_every=commit_every),
                               progress=lambda done, total: progress.update(task, completed=done))
    return summary


def _print_index_summary(summary, db: Path, *, show_errors: int = 20, activation_notice: bool = True) -> None:
    if summary.repaired:
        err_console.print("[yellow]repaired the store first: removed " + ", ".join(
            f"{n} duplicate {kind} row(s)" for kind, n in summary.repaired.items())
            + " (written by two commands at once before the store had a writer lock)[/]")
    table = Table(title=f"index summary ({db})", show_header=False)
    for name, value in (("image files found", summary.found), ("newly embedded", summary.embedded),
                        ("skipped as unchanged", summary.unchanged), ("duplicates (same content)", summary.duplicates),
                        ("split/label updated", summary.relabeled),
                        ("removed (file gone)", summary.removed), ("errors", len(summary.errors)),
                        ("embedding version", summary.fingerprint),
                        ("time", f"{summary.seconds:.1f} s ({summary.images_per_second:.1f} img/s)")):
        table.add_row(name, str(value))
    console.print(table)
    if summary.errors:
        errors = Table(title=f"files that could not be indexed ({len(summary.errors)})")
        errors.add_column("path", overflow="fold")
        errors.add_column("reason", overflow="fold")
        for path, reason in summary.errors[:show_errors]:
            errors.add_row(path, reason)
        if len(summary.errors) > show_errors:
            errors.add_row(f"... and {len(summary.errors) - show_errors} more", "see `clipfuse info --errors`")
        console.print(errors)
    before = summary.previous_active
    if before is not None and activation_notice:
        err_console.print(
            f"[yellow]version {summary.fingerprint[:12]} is now the active version (the default of every command); "
            f"the previously active {before['fingerprint'][:12]} ({before['model']}, {before['rows']} images) is kept: "
            f"pass --version {before['fingerprint'][:12]} to use it.[/]", highlight=False, soft_wrap=True)


@app.command()
@_runtime_errors
def index(
    labeled_dir: Annotated[Optional[Path], typer.Argument(
        exists=True, file_okay=False, help="Labeled images, one sub-folder per class: LABELED_DIR/<class>/<image>.")] = None,
    unlabeled: Annotated[Optional[Path], typer.Option(
        exists=True, file_okay=False, help="Folder of unlabeled images (searched recursively).")] = None,
    test: Annotated[Optional[Path], typer.Option(
        exists=True, file_okay=False, help="Test images: class sub-folders or a plain folder.")] = None,
    db: DbOpt = Path("clipfuse.lance"),
    model: ModelOpt = None,
    pretrained: PretrainedOpt = None,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = Precision.fp32,
    batch_size: BatchOpt = 32,
    workers: WorkersOpt = None,
    allow_random_weights: RandomOpt = False,
    commit_every: Annotated[int, typer.Option(min=1, help="Images per database commit (work lost on a crash).")] = 512,
    max_file_size: Annotated[int, typer.Option(
        min=1, help="Largest image file read, in MiB; larger files are listed as errors.")] = 512,
):
    """Embed every new or changed image once into the store.

    Re-running skips unchanged files; identical content under two paths is embedded once;
    a killed run resumes where it stopped. Unreadable files are listed with a reason.

    Examples:

        clipfuse index data/train --unlabeled data/unlabeled --test data/test

        clipfuse index data/train --model ViT-B-16 --pretrained ~/weights/vitb16.safetensors

        clipfuse index data/train --model local-dir:./my-model --db runs/store.lance
    """
    from clipfuse.data import scan_folders

    if labeled_dir is None and unlabeled is None and test is None:
        raise typer.BadParameter("give a LABELED_DIR and/or --unlabeled DIR / --test DIR.")
    _check_device(device, precision.value)
    store = _open_store(db, must_exist=False)

    def scan():
        return scan_folders(labeled_dir, unlabeled=unlabeled, test=test,
                            known_classes=None if store.is_empty else store.classes())

    scan()  # a layout mistake fails now, before the model loads
    config = _embedder_config(store, model=model, pretrained=pretrained, device=device, precision=precision.value,
                              batch_size=batch_size, workers=workers, allow_random=allow_random_weights)
    config = dataclasses.replace(config, max_file_bytes=max_file_size * 2**20)
    embedder = _load_embedder(config)
    with store.writer("clipfuse index"):
        # listed again under the lock: a run that waited for another writer sees the files as they are now,
        # so it never removes the rows of files that appeared meanwhile
        summary = _run_index(store, embedder, scan(), commit_every=commit_every)
    _print_index_summary(summary, db)
    console.print(f"indexed {summary.embedded} new, {summary.unchanged} unchanged, {summary.duplicates} duplicates, "
                  f"{len(summary.errors)} errors into {db}")


def _resolve_query(store, version: dict, query: Optional[str], text: Optional[str], model_config=None,
                   device: str = "auto"):
    """Return (query vector (1, dim), description) for an image file, an id or a text.

    ``model_config`` names the model to embed the query with; None means the version's own.
    """
    from clipfuse.data import IMAGE_EXTENSIONS, hash_bytes
    from clipfuse.embed import is_image_only

    if text is not None:
        if version["model"].startswith("imported:"):
            raise ValueError(f"version {version['fingerprint']} was imported without a model, so texts can't be "
                             "embedded for it; re-import with --model, or query by image id.")
        if is_image_only(model_config.model if model_config else version["model"]):
            raise ValueError(f"version {version['fingerprint'][:12]} was made by {version['model']}, an image-only "
                             "backbone with no text tower; query by image, or pick a CLIP version with --version.")
        embedder = _query_embedder(version, model_config, device)
        return embedder.encode_texts([text]), f"text {text!r}"
    path = Path(query)
    if path.exists() and not path.is_dir():
        from clipfuse.data import read_regular_file

        try:
            data, _ = read_regular_file(path)
        except OSError as e:
            raise typer.BadParameter(f"can't read query image {query!r}: {e.strerror or e}.",
                                     param_hint="IMAGE_OR_ID") from e
        id_ = hash_bytes(data)
        if model_config is None and id_ in store.embedded_ids(version["fingerprint"]):
            return store.vectors_for([id_], version["fingerprint"]), f"{path} (id {id_}, stored vector)"
        if version["model"].startswith("imported:"):
            raise ValueError(f"{path} is not in imported version {version['fingerprint']} and the version has no "
                             "model to embed it with; re-import with --model.")
        from clipfuse.embed import read_image

        record, img = read_image(str(path))
        if img is None:
            raise typer.BadParameter(f"can't read query image {str(path)!r}: {record.error}.", param_hint="IMAGE_OR_ID")
        embedder = _query_embedder(version, model_config, device)
        return embedder.encode_images([img]), f"{path} (embedded now)"
    try:  # an id, which may look like a path ("train/0001")
        return store.vectors_for([query], version["fingerprint"]), f"id {query}"
    except KeyError:
        if not (path.is_dir() or path.suffix.lower() in IMAGE_EXTENSIONS or os.sep in query):
            raise
    what = "is a folder" if path.is_dir() else "does not exist"
    raise typer.BadParameter(f"query image {query!r} {what}, and no image of version {version['fingerprint'][:12]} "
                             "has that id; pass an existing image file or an image id.", param_hint="IMAGE_OR_ID")


def _query_embedder(version: dict, model_config, device: str):
    """The model that made ``version``; fails if the one asked for has another fingerprint."""
    from clipfuse.embed import EmbedderConfig

    config = model_config or EmbedderConfig(model=version["model"], pretrained=version["pretrained"], device=device,
                                            random_weights=bool(version["random_weights"]))
    embedder = _load_embedder(config)
    if embedder.fingerprint != version["fingerprint"]:
        raise ValueError(
            f"model {config.model!r} (fingerprint {embedder.fingerprint}, {embedder.dim}-d) did not make embedding "
            f"version {version['fingerprint']} ({version['model']}, {version['dim']}-d): its vectors are not "
            "comparable. Query with the version's model, pick another version with --version, or index the "
            "images with this model first."
        )
    return embedder


@app.command()
@_runtime_errors
def neighbors(
    query: Annotated[Optional[str], typer.Argument(help="An image file or an image id.")] = None,
    text: Annotated[Optional[str], typer.Option("--text", help="Search by text instead, e.g. 'a photo of a cat'.")] = None,
    k: Annotated[int, typer.Option("-k", "--k", min=1, help="Number of neighbours.")] = 10,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    db: DbOpt = Path("clipfuse.lance"),
    version: VersionOpt = None,
    model: Annotated[Optional[str], typer.Option(
        "--model", help="Embed the query with this model (must be the version's model).")] = None,
    pretrained: PretrainedOpt = None,
    device: DeviceOpt = "auto",
    exact: Annotated[Optional[bool], typer.Option(
        "--exact/--ann", help="Force exact or approximate search (default: exact below 50,000 rows).")] = None,
):
    """Nearest neighbours of an image (file or id) or a text, by cosine similarity.

    Examples:

        clipfuse neighbors data/unlabeled/img_0042.jpg -k 5

        clipfuse neighbors 3f2a9c0d1e5b4a7f8c6d2e1f0a9b8c7d --json

        clipfuse neighbors --text "a photo of a seven"
    """
    from clipfuse.embed import EmbedderConfig

    if (query is None) == (text is None):
        raise typer.BadParameter("give either an IMAGE_OR_ID argument or --text, not both or neither.")
    _check_device(device)
    store = _open_store(db)
    ver = _get_version(store, version)
    if model == ver["model"] and pretrained is None:
        pretrained = ver["pretrained"]
    model_config = EmbedderConfig(model=model, pretrained=pretrained, device=device) if model else None
    vector, described = _resolve_query(store, ver, query, text, model_config, device)
    found, sims = store.search(vector, k=k, fingerprint=ver["fingerprint"], exact=exact)
    rows = _describe(store, found[0], sims[0])
    if as_json:
        typer.echo(json.dumps({"query": described, "version": ver["fingerprint"], "neighbors": rows}, indent=2))
        return
    table = Table(title=f"neighbours of {described}")
    for col, kw in (("rank", {"justify": "right"}), ("id", {}), ("path", {"overflow": "fold"}), ("label", {}),
                    ("split", {}), ("similarity", {"justify": "right"})):
        table.add_column(col, **kw)
    for r in rows:
        extra = f" (+{len(r['paths']) - 1} more)" if len(r["paths"]) > 1 else ""
        table.add_row(str(r["rank"]), r["id"], (r["paths"][0] if r["paths"] else "") + extra, r["label"] or "",
                      r["split"] or "", f"{r['similarity']:.4f}")
    console.print(table)


def _describe(store, ids, sims) -> list[dict]:
    images = store.images().to_pylist()
    by_id: dict[str, list[dict]] = {}
    for r in images:
        by_id.setdefault(r["id"], []).append(r)
    out = []
    for rank, (id_, sim) in enumerate(zip(ids, sims), start=1):
        rows = by_id.get(str(id_), [])
        labels = sorted({r["label"] for r in rows if r["label"]})
        out.append({"rank": rank, "id": str(id_), "paths": [r["path"] for r in rows],
                    "label": ",".join(labels) or None, "split": rows[0]["split"] if rows else None,
                    "similarity": round(float(sim), 6)})
    return out


@app.command()
@_runtime_errors
def info(
    db: DbOpt = Path("clipfuse.lance"),
    errors: Annotated[bool, typer.Option("--errors", help="List every file that could not be indexed.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
):
    """What the store holds: tables, images per split and class, embedding versions, errors.

    Examples:

        clipfuse info

        clipfuse info --db runs/store.lance --errors
    """
    from clipfuse.embed import is_image_only

    store = _open_store(db)
    summary = store.info()
    if errors:
        summary["error_list"] = store.errors().select(["path", "reason"]).to_pylist()
    if as_json:
        typer.echo(json.dumps(summary, indent=2, default=str))
        return
    console.print(f"[bold]store[/] {summary['uri']}  tables: {', '.join(summary['tables'])}")
    console.print(f"{summary['images']} image rows, {summary['unique_images']} unique contents; "
                  + ", ".join(f"{k}: {v}" for k, v in sorted(summary["per_split"].items())))
    if summary["per_class"]:
        classes = Table(title=f"labeled images per class ({len(summary['per_class'])} classes)")
        classes.add_column("class")
        classes.add_column("labeled", justify="right")
        for name, n in summary["per_class"].items():
            classes.add_row(name, str(n))
        console.print(classes)
    versions = Table(title="embedding versions")
    for col in ("active", "fingerprint", "model", "pretrained", "dim", "rows", "source"):
        versions.add_column(col)
    for v in summary["versions"]:
        model_name = v["model"] + (" [red](random weights)[/]" if v["random_weights"] else "") \
            + (" (image-only)" if is_image_only(v["model"]) else "")
        versions.add_row("*" if v["fingerprint"] == summary["active"] else "", v["fingerprint"], model_name,
                         v["pretrained"] or "", str(v["dim"]), str(v["rows"]), v["source"] or "")
    console.print(versions)
    console.print(f"index errors: {summary['errors']}" + ("" if errors or not summary["errors"] else
                                                          "  (list them with --errors)"))
    dups = {k: v for k, v in summary["duplicates"].items() if v}
    if dups:
        err_console.print("[yellow]duplicate rows: " + ", ".join(f"{n} {kind}" for kind, n in dups.items())
                          + " (written by two commands at once before the store had a writer lock; reads count "
                          "each once, and the next `clipfuse index` removes them)[/]")
    for e in summary.get("error_list", []):
        console.print(f"  {e['path']}: {e['reason']}", highlight=False)


@app.command("import-embeddings")
@_runtime_errors
def import_embeddings(
    source: Annotated[Path, typer.Argument(
        exists=True, help="clip-retrieval output folder (img_emb/ + metadata/), or a .npy file of vectors.")],
    metadata: Annotated[Optional[Path], typer.Option(
        exists=True, dir_okay=False, help="With a .npy SOURCE: parquet/CSV with one row per vector and a "
        "path (or image_path) and/or id column, optional label and split columns.")] = None,
    image_root: Annotated[Optional[Path], typer.Option(help="Folder that relative image paths are resolved against.")] = None,
    split: Annotated[Split, typer.Option(help="Split of rows without a split or label column.")] = Split.unlabeled,
    db: DbOpt = Path("clipfuse.lance"),
    model: Annotated[Optional[str], typer.Option(
        "--model", help="The model that made the vectors (open_clip, timm:<name>, effnet-lite0), if it can be "
        "loaded here; enables image queries (and, for CLIP, text queries) against them.")] = None,
    pretrained: PretrainedOpt = None,
    device: DeviceOpt = "auto",
):
    """Bring precomputed embeddings in (e.g. made on a GPU box with clip-retrieval).

    Image ids are content hashes of the files when they are readable here, or the
    metadata's `id` column.

    Examples:

        clipfuse import-embeddings clip_out/ --image-root /data/images

        clipfuse import-embeddings vectors.npy --metadata rows.parquet --model ViT-B-32 --pretrained laion2b_s34b_b79k
    """
    from clipfuse.embed import EmbedderConfig
    from clipfuse.store import import_embeddings as run_import
    from clipfuse.store import read_clip_retrieval, read_npy_table

    if source.is_dir():
        if metadata is not None:
            raise typer.BadParameter("--metadata goes with a .npy SOURCE, not a clip-retrieval folder.")
        data = read_clip_retrieval(source)
    elif source.suffix == ".npy":
        if metadata is None:
            raise typer.BadParameter("a .npy SOURCE needs --metadata FILE (parquet or CSV) with one row per vector.")
        data = read_npy_table(source, metadata)
    else:
        raise typer.BadParameter(f"SOURCE {str(source)!r} must be a clip-retrieval folder or a .npy file.")
    model_info = None
    if model is not None:
        _check_device(device)
        embedder = _load_embedder(EmbedderConfig(model=model, pretrained=pretrained, device=device))
        model_info = embedder.info.to_dict()
    store = _open_store(db, must_exist=False)
    result = run_import(store, data, model_info=model_info, image_root=image_root, split=split.value)
    if result["duplicate_ids"] or result["duplicate_paths"]:
        err_console.print(
            f"[yellow]{result['duplicate_ids']} row(s) repeat a content id (the first vector of each id is kept"
            + (f"; {result['conflicting_ids']} came with a different vector" if result["conflicting_ids"] else "")
            + f") and {result['duplicate_paths']} repeat a path (the first row is kept), e.g. {result['example']}[/]",
            highlight=False, soft_wrap=True)
    console.print(f"imported {result['rows']} vectors ({data.vectors.shape[1]}-d) for {result['images']} images "
                  f"as version {result['fingerprint']} ({result['hashed']} ids hashed from files) into {db}")


# ---- classifier stack ---------------------------------------------------------------------------
class ExportSplit(str, Enum):
    unlabeled = "unlabeled"
    test = "test"
    all = "all"


def _class_words(path: Optional[Path], classes: list[str]) -> dict[str, list[str]]:
    """Class words from a YAML/JSON file (naming the classes it leaves out) or the folder names."""
    from clipfuse.data import default_class_words, load_class_words

    if path is None:
        return default_class_words(classes)
    words, defaulted = load_class_words(path, classes)
    if defaulted:
        err_console.print(f"[yellow]{len(defaulted)} class(es) not in {path} use their folder name: "
                          f"{', '.join(defaulted[:10])}{' ...' if len(defaulted) > 10 else ''}[/]")
    return words


def _text_embeddings(version: dict, classes: list[str], class_words: Optional[Path], device: str, embedder=None):
    """Class text embeddings of the version's model, or (None, reason) when it has no usable text tower.

    ``embedder`` is the version's model when the caller has it loaded already.
    """
    from clipfuse.embed import PretrainedWeightsError, class_text_embeddings, is_image_only

    words = _class_words(class_words, classes)
    if version["model"].startswith("imported:"):
        return None, f"version {version['fingerprint'][:12]} was imported without a model, so there is no text tower"
    if is_image_only(version["model"]):
        return None, f"{version['model']} is an image-only backbone: it has no text tower"
    try:
        if embedder is None or embedder.fingerprint != version["fingerprint"]:
            embedder = _query_embedder(version, None, device)
        return class_text_embeddings(embedder, classes, words), None
    except (PretrainedWeightsError, ValueError, OSError) as e:
        return None, str(e).splitlines()[0]


def _finite(value):
    """``value`` with NaN/inf floats replaced by None, so the JSON is strict."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _scores_table(title: str, scores: dict, weights: dict | None = None, seconds: dict | None = None) -> Table:
    table = Table(title=title)
    for col in ("head", "accuracy", "macro-F1", "NLL", "ECE"):
        table.add_column(col, justify="left" if col == "head" else "right")
    if weights is not None:
        table.add_column("fusion weight", justify="right")
    if seconds is not None:
        table.add_column("fit s", justify="right")
    for head, s in scores.items():
        row = [f"[bold]{head}[/]" if head == "fused" else head, f"{s['accuracy']:.3f}", f"{s['macro_f1']:.3f}",
               f"{s['nll']:.3f}", f"{s['ece']:.3f}"]
        if weights is not None:
            row.append(f"{weights[head]:.3f}" if head in weights else "")
        if seconds is not None:
            row.append(f"{seconds[head]:.1f}" if head in seconds else "")
        table.add_row(*row)
    return table


def _require_labels(store, version: dict, es, *, val_fraction: float, seed: int) -> None:
    """Fail, saying what is missing, unless the labels can train and score a classifier:
    two classes or more, and at least one label that the seeded split holds out."""
    import numpy as np

    from clipfuse.data import split_labeled

    n_labeled = int(np.sum(es.labels >= 0))
    if n_labeled == 0:
        others = [v for v in store.versions() if v["fingerprint"] != version["fingerprint"] and v["rows"]]
        hint = ("; other versions: " + ", ".join(f"{v['fingerprint'][:12]} ({v['model']}, {v['rows']} images)"
                                                  for v in others) + ". Pick one with --version"
                if others else "; index a folder with one sub-folder per class")
        raise ValueError(f"version {version['fingerprint'][:12]} ({version['model']}, {len(es.ids)} images) of store "
                         f"{store.uri!r} has no labeled images{hint}.")
    labeled_classes = sorted({es.classes[i] for i in es.labels[es.labels >= 0]})
    if len(labeled_classes) < 2:
        raise ValueError(f"only one class ({labeled_classes[0]!r}) has labeled images in version "
                         f"{version['fingerprint'][:12]}: telling classes apart needs labeled images of at least two. "
                         "Add another class folder (LABELED_DIR/<class>/<image>) and index it.")
    if not split_labeled(es.labels, val_fraction=val_fraction, seed=seed)[1].size:
        raise ValueError(f"every class has a single labeled image ({n_labeled} labels for {len(labeled_classes)} "
                         "classes), so none can be held out for validation; label at least two images of some "
                         "classes.")


def _train_heads(store, version: dict, config, *, device: str, embedder=None):
    """Fit the configured heads and fusion on a version and save them beside the store."""
    import numpy as np

    from clipfuse.classify import create_ensemble_from_config

    es = store.load_embeddings(version["fingerprint"])
    if es.conflicts:
        err_console.print(f"[yellow]{len(es.conflicts)} image(s) are filed under two classes and count as "
                          f"unlabeled, e.g. id {es.conflicts[0]}[/]")
    _require_labels(store, version, es, val_fraction=config.val_fraction, seed=config.seed)
    n_labeled = int(np.sum(es.labels >= 0))
    wants_text = any(h in config.heads for h in ("zero-shot", "knn", "probe"))
    text, reason = _text_embeddings(version, es.classes, config.class_words and Path(config.class_words),
                                    device, embedder) if wants_text else (None, None)
    finetuned, finetuned_reason = _finetuned_head(version, es.classes) if "finetuned" in config.heads else (None, None)
    if finetuned is not None:
        err_console.print("[yellow]note: this version's model was finetuned and WiSE-FT-selected on the same "
                          "validation labels, so validation scores here are optimistic.[/]")
    ensemble = create_ensemble_from_config(config, len(es.classes), text, *(finetuned or (None, None)))
    total = len(config.heads) * (config.n_folds + 1 + int(config.refit))
    done = 0
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err_console) as progress:
        task = progress.add_task("fitting heads", total=total)

        def report(head, stage, step, steps):
            nonlocal done
            done += 1
            progress.update(task, completed=done - 1, description=f"{head}: {stage}")

        ensemble.fit(es.X, es.labels, progress=report)
        progress.update(task, completed=total, description="heads fitted")
    if reason and "zero-shot" in ensemble.unavailable_:
        ensemble.unavailable_["zero-shot"] = reason
    if finetuned_reason and "finetuned" in ensemble.unavailable_:
        ensemble.unavailable_["finetuned"] = finetuned_reason
    resolved = {**dataclasses.asdict(config), "fingerprint": version["fingerprint"], "model": version["model"],
                "pretrained": version["pretrained"], "rows": len(es.ids), "labeled": n_labeled,
                "classes": es.classes, "trained_at": time.time(), "text_embeddings": text is not None}
    folder = _save_heads(store, version, ensemble, es, resolved)
    return ensemble, es, folder


def _save_heads(store, version: dict, ensemble, es, resolved: dict) -> Path:
    """Publish the fitted heads as a new generation of the version's heads folder.

    Everything goes into a fresh folder, then one atomic symlink swap makes it current: a
    crash leaves the previous heads, and a reader (evaluate, predict) that opened the
    previous generation reads it whole.
    """
    import numpy as np

    from clipfuse.classify import save_ensemble
    from clipfuse.data import publish_folder

    def fill(staging: Path) -> None:
        save_ensemble(ensemble, staging, extra={"classes": es.classes, "fingerprint": version["fingerprint"],
                                                "n_fit_rows": len(es.ids)})
        np.save(staging / "fit_ids.npy", es.ids.astype("U"), allow_pickle=False)
        (staging / "config.json").write_text(json.dumps(resolved, indent=2))

    link = store.heads_folder(version["fingerprint"])
    with store.writer("clipfuse train-heads"):
        for leftover in (link.with_name(link.name + ".tmp"), link.with_name(link.name + ".old")):
            if leftover.is_dir() and (link.exists() or leftover.name.endswith(".tmp")):
                shutil.rmtree(leftover)  # left by a run killed before heads had generations
        if not link.exists() and link.with_name(link.name + ".old").is_dir():
            link.with_name(link.name + ".old").rename(link)
        publish_folder(link, fill)
    return link


def _heads_generation(store, version: dict) -> Path | None:
    """The folder of the version's current heads (read-only: readers never rename or repair)."""
    from clipfuse.data import resolve_published

    link = store.heads_folder(version["fingerprint"])
    current = resolve_published(link)
    legacy = link.with_name(link.name + ".old")  # a run killed between the renames of earlier versions
    if current is None and (legacy / "ensemble.json").exists():
        return legacy
    return current


def _finetuned_head(version: dict, classes: list[str]):
    """The classifier saved with the version's model by `clipfuse finetune`/`wise-ft`: ((weight, bias or
    None), None), or (None, reason)."""
    model = version["model"].removeprefix("timm:")
    if not model.startswith("local-dir:"):
        return None, f"version {version['fingerprint'][:12]} was not made by a model finetuned with clipfuse"
    from clipfuse.train import read_model_folder

    try:
        meta, heads = read_model_folder(model[len("local-dir:"):])
    except FileNotFoundError:
        return None, f"version {version['fingerprint'][:12]} was not made by a model finetuned with clipfuse"
    if "finetuned" not in heads or meta.get("classes") != classes[:len(meta.get("classes", []))] \
            or len(meta.get("classes", [])) != len(classes):
        return None, "the finetuned model's classes differ from the store's; finetune again"
    bias = heads["finetuned"].get("bias")
    return (heads["finetuned"]["weight"].numpy(), None if bias is None else bias.numpy()), None


def _load_trained(store, version: dict, es=None):
    """The saved ensemble of a version with its fitted rows mapped onto the store's current rows."""
    import numpy as np

    from clipfuse.classify import load_ensemble

    folder = _heads_generation(store, version)
    if folder is None or not (folder / "ensemble.json").exists():
        raise FileNotFoundError(f"no trained heads for version {version['fingerprint'][:12]} in {store.uri}; "
                                "run `clipfuse train-heads` first.")
    es = es or store.load_embeddings(version["fingerprint"])
    fit_ids = np.load(folder / "fit_ids.npy", allow_pickle=False)
    position = {id_: i for i, id_ in enumerate(es.ids)}
    rows = np.array([position.get(i, -1) for i in fit_ids], dtype=np.int64)
    X_fit = np.zeros((len(fit_ids), es.X.shape[1]), dtype=np.float32)  # a removed image never wins a vote
    X_fit[rows >= 0] = es.X[rows[rows >= 0]]
    ensemble, meta = load_ensemble(folder, external={"X_fit_": X_fit})
    if meta.get("n_fit_rows") != len(fit_ids):
        raise ValueError(f"the saved heads in {folder} are incomplete (fitted rows and ids disagree); "
                         "run `clipfuse train-heads` again.")
    if meta["classes"] != es.classes[:len(meta["classes"])]:
        raise ValueError(f"the store's classes changed since train-heads ({len(meta['classes'])} then, "
                         f"{len(es.classes)} now); run `clipfuse train-heads` again.")
    if len(es.classes) > len(meta["classes"]):
        err_console.print(f"[yellow]{len(es.classes) - len(meta['classes'])} class(es) were added since "
                          "train-heads; images are predicted among the old classes until you run "
                          "`clipfuse train-heads` again.[/]")
    fit_position = {id_: i for i, id_ in enumerate(fit_ids)}
    fit_rows = np.array([fit_position.get(i, -1) for i in es.ids], dtype=np.int64)
    return ensemble, meta, es, fit_rows, folder


HeadsOpt = Annotated[Optional[str], typer.Option(
    "--heads", help="Comma-separated heads: zero-shot, finetuned, probe, knn, propagation, kmeans, pseudo, "
    "mean-teacher (default: all).")]


@app.command("train-heads")
@_runtime_errors
def train_heads(
    db: DbOpt = Path("clipfuse.lance"),
    version: VersionOpt = None,
    heads: HeadsOpt = None,
    class_words: Annotated[Optional[Path], typer.Option(
        exists=True, dir_okay=False, help="YAML/JSON file mapping class -> words or phrases for the zero-shot "
        "prompts (default: the folder names).")] = None,
    val_fraction: Annotated[float, typer.Option(min=0.01, max=0.99, help="Share of each class's labels held out.")] = 0.2,
    seed: Annotated[int, typer.Option(help="Seed of the split, the folds and the heads.")] = 0,
    folds: Annotated[int, typer.Option(min=2, help="Folds of the out-of-fold predictions the fusion learns from.")] = 3,
    graph: Annotated[str, typer.Option(help="kNN graph of label propagation: auto, exact, ivf or hnsw.")] = "auto",
    probe_zero_shot_prior: Annotated[bool, typer.Option(
        help="Regularise the linear probe toward the zero-shot classifier.")] = False,
    device: DeviceOpt = "auto",
):
    """Fit the classifier heads and their fusion on the store; save them beside it.

    Every head is fitted on the seeded 80/20 split's train labels, scored on its
    validation labels, and refitted on all labels. The fusion weights are learned on
    out-of-fold predictions. Prints the validation table.

    Examples:

        clipfuse train-heads

        clipfuse train-heads --heads propagation,knn,probe --class-words words.yaml
    """
    from clipfuse.classify import DEFAULT_HEADS, HeadsConfig

    names = tuple(h.strip() for h in heads.split(",") if h.strip()) if heads else DEFAULT_HEADS
    if graph not in ("auto", "exact", "ivf", "hnsw"):
        raise typer.BadParameter(f"--graph must be auto, exact, ivf or hnsw; got {graph!r}.")
    try:
        config = HeadsConfig(heads=names, val_fraction=val_fraction, seed=seed, n_folds=folds, graph=graph,
                             probe_zero_shot_prior=probe_zero_shot_prior,
                             class_words=str(class_words) if class_words else None)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--heads") from e
    _check_device(device)
    store = _open_store(db)
    v = _get_version(store, version)
    with store.writer("clipfuse train-heads"):  # taken first: an unwritable store fails before any fitting
        ensemble, es, folder = _train_heads(store, v, config, device=device)
    _print_training(ensemble, folder)


def _print_training(ensemble, folder: Path) -> None:
    console.print(_scores_table(f"validation ({len(ensemble.val_idx_)} held-out labels; heads trained on "
                                f"{len(ensemble.train_idx_)})", ensemble.val_scores_, ensemble.weights_,
                                ensemble.fit_seconds_))
    for head, why in ensemble.unavailable_.items():
        console.print(f"[yellow]{head} skipped:[/] {why}", highlight=False, soft_wrap=True)
    fused = ensemble.val_scores_["fused"]["accuracy"]
    best = max(ensemble.head_names_, key=lambda h: ensemble.val_scores_[h]["accuracy"])
    console.print(f"trained {len(ensemble.head_names_)} heads into {folder}: fused validation accuracy "
                  f"{fused:.3f} (best single head: {best} {ensemble.val_scores_[best]['accuracy']:.3f})")


def _predictions_table(es, fused, per_head, classes):
    """Rows of the predictions table; ``classes`` are the trained classes (the columns of the probabilities)."""
    import numpy as np
    import pyarrow as pa

    n_classes = len(classes)

    def probs(P):
        return pa.FixedSizeListArray.from_arrays(pa.array(P.astype(np.float32).reshape(-1)), n_classes)

    pred = fused.argmax(axis=1)
    known = [es.classes[i] if i >= 0 else None for i in es.labels]
    columns = {
        "id": pa.array(es.ids, pa.string()),
        "split": pa.array(es.splits, pa.string()),
        "label": pa.array([classes[i] for i in pred], pa.string()),
        "label_index": pa.array(pred.astype(np.int32)),
        "confidence": pa.array(fused.max(axis=1).astype(np.float32)),
        "known_label": pa.array(known, pa.string()),
        "probs": probs(fused),
    }
    for head, P in per_head.items():
        columns[f"probs_{head.replace('-', '_')}"] = probs(P)
    return pa.table(columns)


@app.command()
@_runtime_errors
def predict(
    db: DbOpt = Path("clipfuse.lance"),
    version: VersionOpt = None,
    heads: HeadsOpt = None,
):
    """Run the trained heads and fusion over every image; write the predictions table.

    Images indexed after `train-heads` are predicted too (propagation answers for them
    through their nearest fitted neighbours). `--heads` fuses a subset.

    Examples:

        clipfuse predict

        clipfuse predict --heads propagation,knn
    """
    import numpy as np

    store = _open_store(db)
    v = _get_version(store, version)
    with store.writer("clipfuse predict"):
        ensemble, meta, es, fit_rows, _ = _load_trained(store, v)
        names = [h.strip() for h in heads.split(",") if h.strip()] if heads is not None else None
        if names == []:
            raise typer.BadParameter(f"name at least one head; the trained heads are "
                                     f"{', '.join(ensemble.head_names_)}.", param_hint="--heads")
        unknown = [h for h in names or () if h not in ensemble.head_names_ and h not in ensemble.unavailable_]
        if unknown:
            raise typer.BadParameter(f"unknown head(s) {', '.join(unknown)}; the trained heads are "
                                     f"{', '.join(ensemble.head_names_)}.", param_hint="--heads")
        with console.status(f"predicting {len(es.ids)} images ..."):
            fused, per_head = ensemble.predict_proba(es.X, fit_rows=fit_rows, heads=names)
        table = _predictions_table(es, fused, per_head, meta["classes"])
        name = store.write_predictions(table, v["fingerprint"])
    new = int(np.sum(fit_rows < 0))
    console.print(f"predicted {len(es.ids)} images ({new} new since train-heads) with "
                  f"{', '.join(per_head)}; mean confidence {float(fused.max(axis=1).mean()):.3f}; "
                  f"table {name} in {db}")


@app.command()
@_runtime_errors
def evaluate(
    db: DbOpt = Path("clipfuse.lance"),
    version: VersionOpt = None,
    out: Annotated[Path, typer.Option(file_okay=False, help="Folder for metrics.json and the PNG plots.")] = Path("clipfuse-eval"),
):
    """Score the trained heads: validation metrics per head, confusion matrix, class similarity.

    Validation scores come from heads fitted without the validation labels. When the store
    has labeled test images and `predict` has run, they are scored too.

    Examples:

        clipfuse evaluate --out eval/
    """
    import numpy as np

    from clipfuse.classify import plot_class_similarity, plot_confusion, score_predictions

    from clipfuse.data import write_text_atomic

    store = _open_store(db)
    v = _get_version(store, version)
    ensemble, meta, es, fit_rows, _ = _load_trained(store, v)
    classes = meta["classes"]
    y_val = ensemble.val_labels_  # the labels as they were at train-heads time
    scores = {h: score_predictions(y_val, P) for h, P in ensemble.val_proba_.items()}
    order = [h for h in ensemble.head_names_ if h in scores] + ["fused"]
    scores = {h: scores[h] for h in order}
    out.mkdir(parents=True, exist_ok=True)
    plots = [plot_confusion(y_val, ensemble.val_proba_["fused"].argmax(1), classes, out / "confusion_val.png"),
             plot_class_similarity(es.X[es.labels >= 0], es.labels[es.labels >= 0], classes,
                                   out / "class_similarity.png")]
    report = {"fingerprint": v["fingerprint"], "classes": classes, "validation": scores,
              "weights": ensemble.weights_, "unavailable": ensemble.unavailable_}
    console.print(_scores_table(f"validation ({len(y_val)} held-out labels)", scores, ensemble.weights_))
    test = (es.test_labels >= 0) & (es.test_labels < len(classes))  # classes added later: not scored
    later = int(np.sum(es.test_labels >= len(classes)))
    if later:
        err_console.print(f"[yellow]{later} labeled test image(s) belong to classes added after train-heads "
                          f"({', '.join(es.classes[len(classes):][:5])}) and are not scored; run `clipfuse "
                          "train-heads` and `clipfuse predict` again to score them.[/]", highlight=False)
        report["test_skipped_new_classes"] = later
    predictions = store.predictions(v["fingerprint"])
    if test.any() and predictions is not None:
        pred_index = {id_: i for i, id_ in enumerate(predictions["id"].to_pylist())}
        rows = [pred_index.get(i) for i in es.ids[test]]
        have = np.array([r is not None for r in rows])
        P = predictions["probs"].combine_chunks().flatten().to_numpy().reshape(-1, len(classes))
        y_test, P_test = es.test_labels[test][have], P[[r for r in rows if r is not None]]
        test_scores = score_predictions(y_test, P_test)
        report["test"] = test_scores
        plots.append(plot_confusion(y_test, P_test.argmax(1), classes, out / "confusion_test.png"))
        console.print(_scores_table(f"test ({len(y_test)} labeled test images, fused predictions)",
                                    {"fused": test_scores}))
    per_class = Table(title="per-class validation accuracy (fused)")
    per_class.add_column("class")
    per_class.add_column("accuracy", justify="right")
    per_class.add_column("n", justify="right")
    for i, c in enumerate(classes):
        acc = scores["fused"]["per_class_accuracy"][i]
        per_class.add_row(c, "-" if np.isnan(acc) else f"{acc:.3f}", str(int(np.sum(y_val == i))))
    console.print(per_class)
    write_text_atomic(out / "metrics.json", json.dumps(_finite(report), indent=2, allow_nan=False))
    console.print(f"fused validation accuracy {scores['fused']['accuracy']:.3f}; wrote metrics.json, "
                  + ", ".join(p.name for p in plots) + f" to {out}")


@app.command()
@_runtime_errors
def export(
    path: Annotated[Path, typer.Argument(dir_okay=False, help="CSV file to write, e.g. predictions.csv.")],
    db: DbOpt = Path("clipfuse.lance"),
    version: VersionOpt = None,
    split: Annotated[ExportSplit, typer.Option(help="Images to export: unlabeled, test or all.")] = ExportSplit.unlabeled,
    probs: Annotated[bool, typer.Option("--probs", help="Add one probability column per class.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing file.")] = False,
    raw_cells: Annotated[bool, typer.Option(
        "--raw-cells", help="Write text cells exactly as stored, even ones a spreadsheet would run as a formula "
        "(for programs that read the CSV; never open such a file in a spreadsheet).")] = False,
):
    """Write the predictions as a CSV: path, id, label, confidence [, one column per class].

    One row per image file of the chosen split, in path order, ready for a Kaggle-style
    submission. Run `clipfuse predict` first. Text cells (and headers) that start with
    = + - @ or a tab get a leading ' so that a spreadsheet shows them instead of running
    them (CSV injection); --raw-cells turns that off.

    Examples:

        clipfuse export predictions.csv --split test

        clipfuse export all.csv --split all --probs --force
    """
    import polars as pl

    from clipfuse.data import is_stream, write_frame_csv

    try:
        stream = is_stream(path)  # /dev/stdout or a FIFO: written into
    except OSError as e:
        raise typer.BadParameter(str(e), param_hint="PATH") from e
    if os.path.lexists(path) and not force and not stream:
        raise FileExistsError(f"{str(path)!r} exists; pass --force to overwrite it or choose another file.")
    store = _open_store(db)
    v = _get_version(store, version)
    predictions = store.predictions(v["fingerprint"])
    if predictions is None:
        raise LookupError(f"no predictions for version {v['fingerprint'][:12]}; run `clipfuse predict` first.")
    width = predictions.schema.field("probs").type.list_size
    classes = store.classes()[:width]  # the classes the heads were trained on (classes only get appended)
    pred = pl.from_arrow(predictions.select(["id", "label", "confidence", "probs"]))
    images = pl.from_arrow(store.images().select(["path", "id", "split"]))
    if split != ExportSplit.all:
        images = images.filter(pl.col("split") == split.value)
    df = images.join(pred, on="id", how="inner").sort("path")
    missing = images.height - df.height
    if probs:
        df = df.with_columns(pl.col("probs").arr.to_struct(fields=[f"p_{c}" for c in classes])).unnest("probs")
    else:
        df = df.drop("probs")
    df = df.drop("split")
    write_frame_csv(path, df, raw=raw_cells)  # a unique temporary file, renamed over the target (never through it)
    (err_console if stream else console).print(  # a CSV streamed to stdout gets no summary line mixed in
        f"wrote {df.height} rows ({split.value}) to {path}"
        + (f"; {missing} image(s) have no prediction yet: run `clipfuse predict` again" if missing else ""))



# ---- finetuning ----------------------------------------------------------------------------------
def _labeled_items(store, es, rows) -> list[tuple[str, int]]:
    """(path, class index) of embedding rows, using one labeled path per image id."""
    path_of = {}
    for r in store.images().select(["id", "path", "split"]).to_pylist():
        if r["split"] == "labeled" or r["id"] not in path_of:
            path_of[r["id"]] = r["path"]
    return [(path_of[es.ids[i]], int(es.labels[i])) for i in rows]


def _refuse_model_folder_in_use(store, out: Path) -> None:
    """A model folder that made one of the store's versions must not be overwritten, nor a folder of other files."""
    from clipfuse.train import check_model_folder_target

    check_model_folder_target(out)
    names = {f"local-dir:{out.resolve()}", f"timm:local-dir:{out.resolve()}"}
    used = [v["fingerprint"][:12] for v in store.versions() if v["model"] in names]
    if used:
        raise FileExistsError(f"{str(out)!r} holds the model of embedding version {used[0]}; overwriting it would "
                              "orphan that version. Choose another --out.")


def _pseudo_items(store, fingerprint: str, per_class: int, min_confidence: float) -> list[tuple[str, int]]:
    """The most confident unlabeled predictions, at most ``per_class`` per predicted class."""
    import polars as pl

    predictions = store.predictions(fingerprint)
    if predictions is None:
        raise LookupError("--pseudo-labels needs predictions: run `clipfuse train-heads` and `clipfuse predict` first.")
    pred = pl.from_arrow(predictions.select(["id", "split", "label_index", "confidence"]))
    paths = pl.from_arrow(store.images().select(["id", "path", "split"])).filter(pl.col("split") == "unlabeled")
    top = (pred.filter((pl.col("split") == "unlabeled") & (pl.col("confidence") >= min_confidence))
           .sort("confidence", descending=True).group_by("label_index", maintain_order=True).head(per_class)
           .join(paths.unique("id", keep="first").select(["id", "path"]), on="id"))
    return [(r["path"], int(r["label_index"])) for r in top.to_dicts()]


@app.command()
@_runtime_errors
def finetune(
    db: DbOpt = Path("clipfuse.lance"),
    version: VersionOpt = None,
    out: Annotated[Path, typer.Option(file_okay=False, help="Folder for the finetuned model (a local-dir: model).")] = Path("clipfuse-models/finetuned"),
    epochs: Annotated[int, typer.Option(min=1, help="Passes over the labeled train split.")] = 10,
    lr: Annotated[float, typer.Option(min=0.0, help="AdamW peak learning rate (warmup, then cosine).")] = 1e-5,
    wd: Annotated[float, typer.Option(min=0.0, help="AdamW weight decay.")] = 0.01,
    batch_size: BatchOpt = 32,
    augment: Annotated[bool, typer.Option(help="Random resized crops and flips.")] = False,
    train_text: Annotated[bool, typer.Option(help="Also train the text tower (CLIP models).")] = False,
    freeze_backbone: Annotated[bool, typer.Option(help="Train only the classifier on the frozen image features.")] = False,
    mean_teacher: Annotated[bool, typer.Option(help="Add an EMA teacher and a consistency loss on unlabeled images.")] = False,
    class_words: Annotated[Optional[Path], typer.Option(
        exists=True, dir_okay=False, help="YAML/JSON class words for the initial classifier (default: folder names).")] = None,
    patience: Annotated[int, typer.Option(min=1, help="Epochs without a better validation accuracy before stopping.")] = 3,
    seed: Annotated[int, typer.Option(help="Seed of the split (same as train-heads) and the shuffles.")] = 0,
    pseudo_labels: Annotated[int, typer.Option(
        min=0, help="Also train on up to this many pseudo-labeled images per class: the most confident "
        "unlabeled predictions of `clipfuse predict` (0 = none).")] = 0,
    pseudo_min_confidence: Annotated[float, typer.Option(
        min=0.0, max=1.0, help="Lowest fused confidence a pseudo-label may have.")] = 0.9,
    device: DeviceOpt = "auto",
):
    """Finetune the version's image tower on the labeled images (seeded 80/20 split).

    A CLIP model's classifier starts at the zero-shot text embeddings of the class words.
    An image-only backbone (timm:..., effnet-lite0) gets a linear layer that starts as
    the linear probe on its frozen features ("frozen backbone + FC"), then backbone and
    layer train together (--freeze-backbone trains the layer alone). The epoch with the
    best validation accuracy is kept. The result is a model folder for `clipfuse wise-ft`
    and `clipfuse reembed`.

    Examples:

        clipfuse finetune --epochs 10 --lr 1e-5 --augment --out models/ft
    """
    from clipfuse.data import split_labeled
    from clipfuse.embed import DEFAULT_TEMPLATES, build_prompts, class_text_embeddings, is_image_only
    from clipfuse.train import FinetuneConfig, model_config, save_model_folder
    from clipfuse.train import finetune as run_finetune

    config = FinetuneConfig(epochs=epochs, lr=lr, weight_decay=wd, batch_size=batch_size, augment=augment,
                            train_text=train_text, freeze_backbone=freeze_backbone, patience=patience,
                            mean_teacher=mean_teacher, seed=seed)
    _check_device(device)
    store = _open_store(db)
    v = _get_version(store, version)
    if v["model"].startswith("imported:"):
        raise ValueError(f"version {v['fingerprint'][:12]} was imported without a model; finetuning needs one. "
                         "Re-import with --model, or index the images with a model.")
    if train_text and is_image_only(v["model"]):
        raise typer.BadParameter(f"--train-text needs a CLIP model; {v['model']} is an image-only backbone.")
    _refuse_model_folder_in_use(store, out)
    es = store.load_embeddings(v["fingerprint"])
    _require_labels(store, v, es, val_fraction=0.2, seed=seed)
    train_idx, val_idx = split_labeled(es.labels, val_fraction=0.2, seed=seed)
    train, val = _labeled_items(store, es, train_idx), _labeled_items(store, es, val_idx)
    if pseudo_labels:
        pseudo = _pseudo_items(store, v["fingerprint"], pseudo_labels, pseudo_min_confidence)
        console.print(f"adding {len(pseudo)} pseudo-labeled images (at most {pseudo_labels} per class, "
                      f"confidence >= {pseudo_min_confidence})")
        train = train + pseudo
    words = _class_words(class_words, es.classes)
    embedder = _query_embedder(v, None, device)
    folder_config = model_config(v["model"], embedder.model)  # fails now rather than after training
    text = class_text_embeddings(embedder, es.classes, words) if embedder.has_text else None
    unlabeled = [r["path"] for r in store.images().select(["path", "split"]).to_pylist() if r["split"] == "unlabeled"]
    prompts = [build_prompts(words[c], DEFAULT_TEMPLATES) for c in es.classes] if embedder.has_text else None
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.fields[status]}"), console=err_console) as progress:
        task = progress.add_task("epoch 1", total=None, status="")

        def report(epoch, step, steps, loss, val_acc):
            status = f"loss {loss:.4f}" + ("" if val_acc is None else f"  val acc {val_acc:.3f}")
            progress.update(task, description=f"epoch {epoch}/{epochs}", completed=step, total=steps, status=status)

        result = run_finetune(embedder, train, val, text, config, n_classes=len(es.classes), unlabeled=unlabeled,
                              prompts=prompts, progress=report)
    for h in result.history:
        console.print(f"epoch {h['epoch']}: train loss {h['train_loss']:.4f}, val accuracy {h['val_accuracy']:.3f} "
                      f"({h['seconds']:.0f} s)", highlight=False)
    meta = {"kind": "finetuned", "base_model": v["model"], "base_pretrained": v["pretrained"],
            "base_fingerprint": v["fingerprint"], "base_random_weights": bool(v["random_weights"]),
            "classes": es.classes, "class_words": words, "config": dataclasses.asdict(config),
            "history": result.history, "start": result.start_name, "start_accuracy": result.start_accuracy,
            "best_epoch": result.best_epoch, "val_ids": [str(es.ids[i]) for i in val_idx],
            "val_labels": [int(es.labels[i]) for i in val_idx], "train_images": len(train),
            "pseudo_labels": pseudo_labels, "pseudo_min_confidence": pseudo_min_confidence}
    save_model_folder(out, embedder.model, folder_config, heads={"finetuned": result.head, "start": result.start},
                      meta=meta, tokenizer=embedder.tokenizer)
    best = max([result.start_accuracy] + [h["val_accuracy"] for h in result.history])
    console.print(f"finetuned on {len(train)} images: validation accuracy {result.start_accuracy:.3f} "
                  f"({result.start_name}) -> {best:.3f} (epoch {result.best_epoch}); model in {out}. "
                  f"Next: clipfuse wise-ft --checkpoint {out}")


@app.command("wise-ft")
@_runtime_errors
def wise_ft(
    checkpoint: Annotated[Path, typer.Option(exists=True, file_okay=False, help="Folder written by `clipfuse finetune`.")],
    db: DbOpt = Path("clipfuse.lance"),
    alphas: Annotated[str, typer.Option(help="Mixing weights: start:stop:step or a comma list; 0 = the start "
                                        "(zero-shot, or the linear probe of an image-only backbone), 1 = finetuned.")] = "0:1:0.1",
    out: Annotated[Optional[Path], typer.Option(file_okay=False, help="Folder for the chosen model (default: CHECKPOINT-wiseft).")] = None,
    device: DeviceOpt = "auto",
):
    """WiSE-FT: interpolate the starting and finetuned weights, keep the best alpha on validation.

    Backbone and classifier are both interpolated: alpha 0 is the base model with the
    zero-shot classifier (CLIP) or the linear probe (image-only backbones).

    Writes the chosen model (a model folder, like finetune's) and alpha_curve.png.

    Examples:

        clipfuse wise-ft --checkpoint models/ft --alphas 0:1:0.1
    """
    import torch

    from clipfuse.embed import EmbedderConfig, read_image
    from clipfuse.train import encode, load_state, parse_alphas, plot_alpha_curve, read_model_folder, save_model_folder, sweep

    try:
        grid = parse_alphas(alphas)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--alphas") from e
    _check_device(device)
    meta, heads = read_model_folder(checkpoint)
    if meta.get("kind") != "finetuned":
        raise ValueError(f"{str(checkpoint)!r} holds a {meta.get('kind')} model; pass a `clipfuse finetune` folder.")
    out = out or checkpoint.with_name(checkpoint.name + "-wiseft")
    embedder = _load_embedder(EmbedderConfig(model=meta["base_model"], pretrained=meta["base_pretrained"],
                                             device=device, random_weights=meta["base_random_weights"]))
    if embedder.fingerprint != meta["base_fingerprint"]:
        raise ValueError(f"model {meta['base_model']!r} no longer loads as the model that was finetuned "
                         f"(fingerprint {embedder.fingerprint[:12]}, expected {meta['base_fingerprint'][:12]}).")
    base_state = {k: v.detach().cpu().clone() for k, v in embedder.model.state_dict().items()}
    finetuned_state = load_state(checkpoint)  # CPU tensors; load_state_dict moves them to the model's device
    store = _open_store(db)
    _refuse_model_folder_in_use(store, out)
    paths = {r["id"]: r["path"] for r in store.images().select(["id", "path"]).to_pylist()}
    val_ids, val_labels, images = [], [], []
    for id_, label in zip(meta["val_ids"], meta["val_labels"]):
        img = read_image(paths[id_])[1] if id_ in paths else None
        if img is not None:  # deleted or unreadable since finetuning: skipped
            val_ids.append(id_)
            val_labels.append(label)
            images.append(img)
    if not val_ids:
        raise ValueError(f"none of the {len(meta['val_ids'])} validation images of {checkpoint} can be read from "
                         f"{db}; run wise-ft against the store the model was finetuned on.")
    labels = torch.tensor(val_labels)
    pixels = torch.stack([embedder.preprocess(img) for img in images])
    stored = None
    if meta["base_fingerprint"] in {v["fingerprint"] for v in store.versions()}:
        try:
            stored = store.vectors_for(val_ids, meta["base_fingerprint"])
        except KeyError:
            stored = None  # some were never embedded by the base model: encode them all

    def val_features(alpha, model):
        if alpha == 0.0 and stored is not None:
            return stored  # the base model made the store's vectors: no need to re-encode
        return encode(model, pixels, device=embedder.device)

    with console.status("sweeping alpha ..."):
        result = sweep(embedder.model, base_state, finetuned_state, heads["start"], heads["finetuned"], grid,
                       val_features, labels)
    table = Table(title=f"WiSE-FT on {len(val_ids)} validation images")
    table.add_column("alpha", justify="right")
    table.add_column("val accuracy", justify="right")
    for a, acc in zip(result["alphas"], result["accuracies"]):
        mark = " *" if a == result["best_alpha"] else ""
        table.add_row(f"{a:g}", f"{acc:.3f}{mark}")
    console.print(table)
    from clipfuse.train import model_config

    save_model_folder(out, embedder.model, model_config(meta["base_model"], embedder.model),
                      heads={"finetuned": result["head"], "start": heads["start"]},
                      tokenizer=embedder.tokenizer,
                      meta={**meta, "kind": "wise-ft", "alpha": result["best_alpha"],
                            "alpha_curve": dict(zip(map(str, result["alphas"]), result["accuracies"]))})
    start_name = meta.get("start", "zero-shot")
    plot = plot_alpha_curve(result["alphas"], result["accuracies"], out / "alpha_curve.png",
                            best_alpha=result["best_alpha"], start_name=start_name)
    console.print(f"best alpha {result['best_alpha']:g}: validation accuracy {result['best_accuracy']:.3f} "
                  f"({start_name} {result['accuracies'][0] if result['alphas'][0] == 0 else float('nan'):.3f}); "
                  f"model in {out}, curve in {plot}. Next: clipfuse reembed --model-checkpoint {out}")


@app.command()
@_runtime_errors
def reembed(
    model_checkpoint: Annotated[Path, typer.Option(exists=True, file_okay=False,
                                                   help="Model folder from `clipfuse finetune` or `wise-ft`.")],
    db: DbOpt = Path("clipfuse.lance"),
    device: DeviceOpt = "auto",
    batch_size: BatchOpt = 32,
    workers: WorkersOpt = None,
    commit_every: Annotated[int, typer.Option(min=1, help="Images per database commit (work lost on a crash).")] = 512,
    max_file_size: Annotated[int, typer.Option(
        min=1, help="Largest image file read, in MiB; larger files are listed as errors.")] = 512,
):
    """Embed every image of the store with a finetuned model, as a new embedding version.

    The previous version stays active and queryable until the new one is complete, then
    the new one becomes active. A killed run resumes where it stopped.

    Examples:

        clipfuse reembed --model-checkpoint models/ft-wiseft
    """
    from clipfuse.data import ImageFile, ImageFolders
    from clipfuse.embed import EmbedderConfig
    from clipfuse.train import model_name_of, read_model_folder

    meta = read_model_folder(model_checkpoint)[0]  # fails clearly on a folder that isn't one
    _check_device(device)
    store = _open_store(db)
    active = store.get_version()["fingerprint"]
    embedder = _load_embedder(EmbedderConfig(model=model_name_of(model_checkpoint), device=device,
                                             batch_size=batch_size, workers=workers,
                                             max_file_bytes=max_file_size * 2**20))
    # the version this one replaces: the active one, or (re-running a finished reembed) the one it came from
    previous = active if active != embedder.fingerprint else meta.get("base_fingerprint")
    with store.writer("clipfuse reembed"):  # the rows read are the rows re-embedded, whoever wrote before
        rows = store.images().select(["path", "split", "label"]).to_pylist()
        # only files that exist: rows of imported vectors ("id:..." paths) or of files gone since indexing
        # have nothing to embed, and must not be dropped from the image table the old version still uses
        files = [ImageFile(r["path"], r["split"], r["label"]) for r in rows if os.path.isfile(r["path"])]
        if len(files) < len(rows):
            err_console.print(f"[yellow]{len(rows) - len(files)} image row(s) have no file on disk and are not "
                              "re-embedded (imported vectors or moved files).[/]")
        summary = _run_index(store, embedder, ImageFolders(files, store.classes(), []), commit_every=commit_every)
    _print_index_summary(summary, db, activation_notice=False)
    kept = (f"; previous version {previous[:12]} is kept (select it with --version)"
            if previous and previous != summary.fingerprint else "")
    console.print(f"re-embedded {summary.embedded} images ({summary.unchanged} already done) as version "
                  f"{summary.fingerprint[:12]}, now active{kept}.")


@app.command()
@_runtime_errors
def demo(
    workdir: Annotated[Path, typer.Option(help="Folder for the sample images and the store.")] = Path("clipfuse-demo"),
    model: Annotated[str, typer.Option("--model", help="Model to try first (falls back to effnet-lite0).")] = "ViT-B-32",
    pretrained: PretrainedOpt = None,
    unlabeled: Annotated[Optional[int], typer.Option(
        min=1, help="Use only this many of the 1,647 unlabeled digits (a quicker run).")] = None,
    device: DeviceOpt = "auto",
    batch_size: BatchOpt = 32,
    k: Annotated[int, typer.Option("-k", "--k", min=1, help="Neighbours to show.")] = 5,
    with_finetune: Annotated[bool, typer.Option("--finetune", help="Then finetune, WiSE-FT, re-embed and train the "
                                                "heads again (a few more minutes on CPU).")] = False,
):
    """Run the whole job on a real sample: sklearn's handwritten digits as PNG files.

    Writes 15 labeled images per class and the rest unlabeled into WORKDIR, indexes them
    into WORKDIR/clipfuse.lance, shows the neighbours of an unlabeled image, trains every
    classifier head and the fusion, scores them against the true classes of the unlabeled
    images, and exports WORKDIR/predictions.csv. Uses the pretrained CLIP model when its
    weights can be loaded; otherwise says so in one line and uses effnet-lite0 (ImageNet
    EfficientNet-Lite0, whose weights ship with clipfuse). Never random weights.

    Examples:

        clipfuse demo

        clipfuse demo --model ViT-B-32 --pretrained ~/weights/vit-b-32.safetensors
    """
    from clipfuse.data import scan_folders, write_digits_dataset
    from clipfuse.embed import EFFNET_LITE0, EmbedderConfig, PretrainedWeightsError, default_pretrained

    console.rule("[bold]clipfuse demo")
    paths = write_digits_dataset(workdir, max_unlabeled=unlabeled)
    console.print(f"wrote sklearn digits to {workdir}: labeled/ (15 per class), unlabeled/, unlabeled_labels.csv")
    db = workdir / "clipfuse.lance"
    store = _open_store(db, must_exist=False)
    config = EmbedderConfig(model=model, pretrained=pretrained, device=device, batch_size=batch_size)
    try:
        embedder = _load_embedder(config)
    except PretrainedWeightsError as e:
        cause = str(e.__cause__ or e).splitlines()[0]
        cause = cause.split(": ")[0] if len(cause) > 90 else cause  # the first clause says enough
        embedder = _load_embedder(EmbedderConfig(model=EFFNET_LITE0, device=device, batch_size=batch_size))
        tag = pretrained or default_pretrained(model)
        err_console.print(f"[yellow]{model}{f' ({tag})' if tag else ''} can't be loaded here ({cause}); using {EFFNET_LITE0} "
                          "instead: ImageNet EfficientNet-Lite0, bundled with clipfuse, image-only (no zero-shot "
                          "head).[/]", highlight=False, soft_wrap=True)
    console.print(f"model: [bold]{embedder.config.model}[/]"
                  + (f" ({embedder.info.pretrained})" if embedder.info.pretrained else ""), highlight=False)
    folders = scan_folders(paths["labeled"], unlabeled=paths["unlabeled"])
    summary = _run_index(store, embedder, folders)
    _print_index_summary(summary, db)

    with open(paths["truth"], newline="", encoding="utf-8") as f:
        truth = {row["path"]: row["label"] for row in csv.DictReader(f)}
    query_path = sorted(truth)[0]
    version = store.get_version(embedder.fingerprint)
    vector, described = _resolve_query(store, version, query_path, None)
    found, sims = store.search(vector, k=k + 1, fingerprint=embedder.fingerprint)
    rows = _describe(store, found[0][1:], sims[0][1:])
    table = Table(title=f"{k} nearest neighbours of {Path(query_path).name} (true class: {truth[query_path]})")
    for col in ("rank", "path", "label / true class", "similarity"):
        table.add_column(col, overflow="fold")
    agree = 0
    for r in rows:
        path = r["paths"][0] if r["paths"] else ""
        cls = r["label"] or truth.get(path, "?")
        agree += cls == truth[query_path]
        table.add_row(str(r["rank"]), os.path.relpath(path), f"{cls}{'' if r['label'] else ' (unlabeled)'}",
                      f"{r['similarity']:.4f}")
    console.print(table)
    console.print(f"{agree} of {len(rows)} neighbours are of the query's true class ({truth[query_path]}).")

    console.rule("[bold]classifier heads")
    _demo_heads(workdir, db, store, version, truth, device=device, embedder=embedder)
    if with_finetune:
        _demo_finetune(workdir, db, store, truth, device=device, batch_size=batch_size)
    active = store.get_version()
    console.print(f"demo done: {summary.found} images in {db} (active version {active['fingerprint']}, "
                  f"{active['model'] if with_finetune else embedder.config.model}"
                  f"{', RANDOM weights' if embedder.info.random_weights else ''}). "
                  f"Try: clipfuse neighbors {os.path.relpath(query_path)} --db {db}; "
                  f"clipfuse evaluate --db {db}")


def _demo_finetune(workdir: Path, db: Path, store, truth: dict, *, device: str, batch_size: int) -> None:
    """finetune -> wise-ft -> reembed -> train-heads -> export, on the demo store."""
    console.rule("[bold]finetune -> WiSE-FT -> reembed -> train-heads")
    models = workdir / "models"
    finetune(db=db, version=None, out=models / "ft", epochs=3, lr=1e-5, wd=0.01, batch_size=batch_size,
             augment=False, train_text=False, freeze_backbone=False, mean_teacher=False, class_words=None,
             patience=3, seed=0,
             pseudo_labels=0, pseudo_min_confidence=0.9, device=device)
    wise_ft(checkpoint=models / "ft", db=db, alphas="0:1:0.25", out=models / "ft-wiseft", device=device)
    reembed(model_checkpoint=models / "ft-wiseft", db=db, device=device, batch_size=batch_size, workers=None,
            commit_every=512)
    _demo_heads(workdir, db, store, store.get_version(), truth, device=device)


def _demo_heads(workdir: Path, db: Path, store, version: dict, truth: dict, *, device: str, embedder=None) -> None:
    """train-heads -> predict -> score on the unlabeled truth -> export, on one version of the demo store."""
    import numpy as np

    from clipfuse.classify import HeadsConfig

    ensemble, es, folder = _train_heads(store, version, HeadsConfig(), device=device, embedder=embedder)
    _print_training(ensemble, folder)
    fused, per_head = ensemble.predict_proba(es.X, fit_rows=np.arange(len(es.ids)))
    store.write_predictions(_predictions_table(es, fused, per_head, es.classes), version["fingerprint"])
    _print_demo_accuracy(store, es, fused, per_head, truth)
    export(workdir / "predictions.csv", db=db, version=version["fingerprint"], split=ExportSplit.unlabeled,
           probs=False, force=True, raw_cells=False)


def _print_demo_accuracy(store, es, fused, per_head, truth: dict) -> None:
    """Accuracy of each head on the demo's unlabeled images, whose true classes the sample knows."""
    import numpy as np

    id_of = {r["path"]: r["id"] for r in store.images().select(["path", "id"]).to_pylist()}
    row_of = {id_: i for i, id_ in enumerate(es.ids)}
    class_index = {c: i for i, c in enumerate(es.classes)}
    pairs = [(row_of[id_of[p]], class_index[c]) for p, c in truth.items() if id_of.get(p) in row_of]
    rows, y = np.array([r for r, _ in pairs]), np.array([c for _, c in pairs])
    table = Table(title="unlabeled images")
    table.add_column("head")
    table.add_column("accuracy", justify="right")
    for head, P in {**per_head, "fused": fused}.items():
        acc = float(np.mean(P[rows].argmax(axis=1) == y))
        table.add_row(f"[bold]{head}[/]" if head == "fused" else head, f"{acc:.3f}")
    console.print(table)
    console.print(f"accuracy on the {len(rows)} unlabeled demo images, against their true classes "
                  "in unlabeled_labels.csv")


if __name__ == "__main__":
    app()
