"""The clipfuse command line: declares options, calls the workspace (clipfuse.workspace), prints what it returns."""

from __future__ import annotations

import functools
import json
from datetime import datetime
import math
import os
import re
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.panel import Panel
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from clipfuse.embed.names import PretrainedWeightsError

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


def _choices(name: str, values) -> type[Enum]:
    """A str Enum of ``values`` (typer shows and checks them as the option's choices)."""
    return Enum(name, {v: v for v in values}, type=str)


Precision = _choices("Precision", ("fp32", "int8", "fp16", "bf16"))
Decode = _choices("Decode", ("full", "draft"))
Split = _choices("Split", ("labeled", "unlabeled", "test"))
ExportSplit = _choices("ExportSplit", ("unlabeled", "test", "all"))
ExportFormat = _choices("ExportFormat", ("clipfuse", "kaggle"))


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
                                 "clipfuse.open('memory://')); --db takes a folder.")
    if uri.scheme in ("s3", "gs", "az"):
        if not uri.netloc:
            raise typer.BadParameter(f"{text!r} names no bucket; an object-store --db is {uri.scheme}://bucket/prefix.")
        return text  # a store on object storage (see --storage-option)
    if "/" in text.split(":", 1)[1][:2] or uri.netloc:
        raise typer.BadParameter(f"{text!r} looks like a URI; --db takes a folder on this machine, or "
                                 "s3://bucket/prefix (gs://, az:// to read).")
    return Path(text)  # a folder that merely has a colon in its name


DbOpt = Annotated[Path, typer.Option("--db", parser=_db_path, help="LanceDB folder of the store (created on first "
                                     "index), or a file:/// URI of one.")]
StorageOpt = Annotated[Optional[list[str]], typer.Option(
    "--storage-option", help="KEY=VALUE for a store on object storage (repeatable; LanceDB's keys: endpoint, "
    "region, aws_access_key_id, ...), over the AWS_* variables.")]
ModelOpt = Annotated[Optional[str], typer.Option(
    "--model", help="CLIP (open_clip) model: a built-in name (ViT-B-32), `hf-hub:org/repo` or `local-dir:/path`; "
    "or an image-only backbone: `timm:<name>` (timm:resnet50.a1_in1k) or `effnet-lite0` (ImageNet weights "
    "bundled, works offline). Default: the store's model, else ViT-B-32.")]
PretrainedOpt = Annotated[Optional[str], typer.Option(
    "--pretrained", help="open_clip pretrained tag (laion2b_s34b_b79k) or a local weights file "
    "(.safetensors / .pt) for open_clip or timm: models; ignored for open_clip's hf-hub: and local-dir: models.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")]
PrecisionOpt = Annotated[Optional[Precision], typer.Option(
    "--precision", help="fp32; int8 on CPU (its own embedding version: ViT-B-32 1.5-1.6x faster on an AVX2 CPU, "
    "vectors at cosine 0.9998 to fp32; queries of it run in int8 too); fp16 / bf16 on GPU (the fp32 version). "
    "Default: the store version's own, else fp32.", show_default=False)]
DecodeOpt = Annotated[Optional[Decode], typer.Option(
    "--decode", help="JPEG decoding: full, or draft (JPEGs at least twice the size the model's preprocessing "
    "resizes to decode at 1/2, "
    "1/4 or 1/8 scale: faster for large photos, slightly different pixels, so its own embedding version). "
    "Default: the store version's own, else full.", show_default=False)]
BatchOpt = Annotated[int, typer.Option("--batch-size", min=1, help="Images per forward pass.")]
WorkersOpt = Annotated[Optional[int], typer.Option(
    "--workers", min=0, help="Decode/resize worker processes (default: 0 on CPU: threads read each batch between "
    "forward passes; up to 8 on GPU).")]
RandomOpt = Annotated[bool, typer.Option(
    "--allow-random-weights", help="If pretrained weights can't be loaded, continue with random ones "
    "(a smoke test: results mean nothing).")]
VersionOpt = Annotated[Optional[str], typer.Option(
    "--version", help="Embedding version (fingerprint or prefix, see `clipfuse info`); default the active one.")]
VersionsOpt = Annotated[Optional[str], typer.Option(
    "--versions", help="Comma-separated versions (fingerprints or prefixes) of the same images: an ensemble over "
    "all of them, one fusion over every (version, head) pair.")]
CommitOpt = Annotated[int, typer.Option(min=1, help="Images per database commit (work lost on a crash).")]
MaxFileOpt = Annotated[int, typer.Option(min=1, help="Largest image file read, in MiB; larger files are listed as errors.")]
HeadsOpt = Annotated[Optional[str], typer.Option(
    "--heads", help="Comma-separated heads: zero-shot, finetuned, probe, knn, propagation, kmeans, pseudo, "
    "mean-teacher (default: all).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")]


# ---- calling the workspace ---------------------------------------------------------------------
def _runtime_errors(func):
    """Library errors become a red one-line message and exit 1; a wrong option value exits 2."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        from clipfuse.workspace import OptionError

        try:
            return func(*args, **kwargs)
        except OptionError as e:
            raise typer.BadParameter(str(e), param_hint=e.option) from e
        except (ValueError, LookupError, OSError, PretrainedWeightsError) as e:
            message = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
            err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from e

    return wrapper


def _show_notice(notice) -> None:
    if notice.kind == "random-weights":
        err_console.print(Panel(escape(notice.message), title="RANDOM WEIGHTS", border_style="bold red"))
    else:
        err_console.print(f"[yellow]{escape(notice.message)}[/]", highlight=False, soft_wrap=True)


def _storage_options(items: list[str] | None) -> dict[str, str] | None:
    """``--storage-option KEY=VALUE`` (repeatable) as a dict."""
    if not items:
        return None
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise typer.BadParameter(f"{item!r} is not KEY=VALUE (e.g. endpoint=http://127.0.0.1:9000).",
                                     param_hint="--storage-option")
        out[key.strip()] = value
    return out


def _check_csv_out(path: Path | None, force: bool) -> None:
    """Refuse to overwrite a --csv file (a half-filled labeling sheet) without --force."""
    import os

    if path is not None and os.path.lexists(path) and not force and not path.is_fifo():
        raise FileExistsError(f"{str(path)!r} exists; pass --force to overwrite it or choose another file.")


def _workspace(db, storage: list[str] | None = None, *, quiet: bool = False):
    """The store at ``--db``; notices are printed (on stderr) as they come, unless ``quiet`` (JSON
    output, which carries what they say)."""
    from clipfuse.workspace import Workspace

    return Workspace(db, on_notice=None if quiet else _show_notice, storage_options=_storage_options(storage))


class _RateColumn(ProgressColumn):
    """Images per second, while images are being embedded (other stages of a run show none)."""

    def render(self, task) -> Text:
        if not str(task.description).startswith("indexing"):
            return Text("")
        return Text(f"{task.speed:,.1f} img/s" if task.speed else "-- img/s", style="progress.data.speed")


class _Bars:
    """A rich progress bar that follows the workspace's ``progress(stage, done, total)`` calls."""

    def __init__(self, *, rate: bool = False):
        columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn()]
        columns += [_RateColumn(), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn()] if rate \
            else [TimeElapsedColumn()]
        self.progress = Progress(*columns, console=err_console, transient=False)
        self.task = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.task is not None:  # shown from the first report on: a command that fails before prints no bar
            self.progress.stop()

    def __call__(self, stage: str, done: int, total: int | None) -> None:
        if self.task is None:
            self.progress.start()
            self.task = self.progress.add_task(stage, total=total)
        elif stage != self.progress.tasks[0].description and stage.startswith("indexing"):
            self.progress.reset(self.task)  # a new run of images: the rate starts afresh
        self.progress.update(self.task, description=stage, completed=done, total=total)


# ---- index, neighbours, info, import ---------------------------------------------------------------
def _print_index_summary(result, *, show_errors: int = 20, activation_notice: bool = True) -> None:
    s = result.summary
    table = Table(title=f"index summary ({result.db})", show_header=False)
    for name, value in (("image files found", s.found), ("newly embedded", s.embedded),
                        ("skipped as unchanged", s.unchanged), ("duplicates (same content)", s.duplicates),
                        ("split/label updated", s.relabeled), ("removed (file gone)", s.removed),
                        ("errors", len(s.errors)), ("embedding version", s.fingerprint),
                        ("time", f"{s.seconds:.1f} s ({s.images_per_second:.1f} img/s)")):
        table.add_row(name, str(value))
    console.print(table)
    if s.errors:
        errors = Table(title=f"files that could not be indexed ({len(s.errors)})")
        errors.add_column("path", overflow="fold")
        errors.add_column("reason", overflow="fold")
        for path, reason in s.errors[:show_errors]:
            errors.add_row(escape(path), escape(reason))
        if len(s.errors) > show_errors:
            errors.add_row(f"... and {len(s.errors) - show_errors} more", "see `clipfuse info --errors`")
        console.print(errors)
    before = s.previous_active
    if before is not None and activation_notice:
        err_console.print(
            f"[yellow]version {s.fingerprint[:12]} is now the active version (the default of every command); "
            f"the previously active {before.short} ({before.model}, {before.rows} images) is kept: "
            f"pass --version {before.short} to use it.[/]", highlight=False, soft_wrap=True)


@app.command()
@_runtime_errors
def index(
    labeled_dir: Annotated[Optional[str], typer.Argument(
        help="Labeled images, one sub-folder per class: LABELED_DIR/CLASS/IMAGE (a folder, or s3://bucket/prefix).",
        show_default=False)] = None,
    unlabeled: Annotated[Optional[str], typer.Option(
        help="Folder of unlabeled images (searched recursively; a folder or s3://...).", show_default=False)] = None,
    test: Annotated[Optional[str], typer.Option(
        help="Test images: class sub-folders or a plain folder (a folder or s3://...).", show_default=False)] = None,
    db: DbOpt = Path("clipfuse.lance"),
    storage_option: StorageOpt = None,
    model: ModelOpt = None,
    pretrained: PretrainedOpt = None,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = None,
    decode: DecodeOpt = None,
    batch_size: BatchOpt = 32,
    workers: WorkersOpt = None,
    allow_random_weights: RandomOpt = False,
    commit_every: CommitOpt = 512,
    max_file_size: MaxFileOpt = 512,
    ray: Annotated[Optional[str], typer.Option(
        "--ray", metavar="auto|local|ADDRESS",
        help="Embed on a Ray cluster (pip install 'clipfuse[ray]'): 'auto' joins the cluster running here "
             "(ray start / RAY_ADDRESS), 'local' starts Ray on this machine for the run, or a cluster address "
             "(ray://head:10001). Each --commit-every images are one commit.", show_default=False)] = None,
    ray_workers: Annotated[Optional[int], typer.Option(
        "--ray-workers", min=1, help="With --ray: model replicas in the actor pool (default: one per GPU, or 1).",
        show_default=False)] = None,
    gpus_per_worker: Annotated[Optional[float], typer.Option(
        "--gpus-per-worker", min=0, help="With --ray: GPUs per model replica (default: 1 when the cluster has GPUs, "
                                         "else 0 = CPU workers).", show_default=False)] = None,
):
    """Embed every new or changed image once into the store.

    Re-running skips unchanged files; identical content under two paths is embedded once;
    a killed run resumes where it stopped. Unreadable files are listed with a reason.

    Examples:

        clipfuse index data/train --unlabeled data/unlabeled --test data/test

        clipfuse index data/train --model ViT-B-16 --pretrained ~/weights/vitb16.safetensors

        clipfuse index data/train --model local-dir:./my-model --db runs/store.lance

        clipfuse index s3://bucket/train --unlabeled s3://bucket/unlabeled --db s3://bucket/store --ray auto
    """
    with _Bars(rate=True) as bars:
        result = _workspace(db, storage_option).index(
            labeled_dir, unlabeled=unlabeled, test=test, model=model, pretrained=pretrained, device=device,
            precision=precision and precision.value, decode=decode and decode.value, batch_size=batch_size,
            workers=workers, allow_random_weights=allow_random_weights, commit_every=commit_every, max_file_size=max_file_size,
            ray=ray, ray_workers=ray_workers, gpus_per_worker=gpus_per_worker, progress=bars)
    _print_index_summary(result)
    s = result.summary
    console.print(f"indexed {s.embedded} new, {s.unchanged} unchanged, {s.duplicates} duplicates, "
                  f"{len(s.errors)} errors into {escape(str(db))}")


def _neighbors_table(result, title: str) -> Table:
    table = Table(title=title)
    for col, kw in (("rank", {"justify": "right"}), ("id", {}), ("path", {"overflow": "fold"}), ("label", {}),
                    ("split", {}), ("similarity", {"justify": "right"})):
        table.add_column(col, **kw)
    for n in result.neighbors:
        extra = f" (+{len(n.paths) - 1} more)" if len(n.paths) > 1 else ""
        table.add_row(str(n.rank), n.id, escape((n.paths[0] if n.paths else "") + extra), escape(n.label or ""),
                      n.split or "", f"{n.similarity:.4f}")
    return table


@app.command()
@_runtime_errors
def neighbors(
    query: Annotated[Optional[str], typer.Argument(help="An image file or an image id.")] = None,
    text: Annotated[Optional[str], typer.Option("--text", help="Search by text instead, e.g. 'a photo of a cat'.")] = None,
    k: Annotated[int, typer.Option("-k", "--k", min=1, help="Number of neighbours.")] = 10,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    db: DbOpt = Path("clipfuse.lance"),
    storage_option: StorageOpt = None,
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
    result = _workspace(db, storage_option).neighbors(query, text=text, k=k, version=version, model=model, pretrained=pretrained,
                                      device=device, exact=exact)
    if as_json:
        typer.echo(json.dumps(result.to_dict(), indent=2))
    else:
        console.print(_neighbors_table(result, f"neighbours of {result.query}"))


@app.command()
@_runtime_errors
def info(
    db: DbOpt = Path("clipfuse.lance"),
    storage_option: StorageOpt = None,
    errors: Annotated[bool, typer.Option("--errors", help="List every file that could not be indexed.")] = False,
    as_json: JsonOpt = False,
):
    """What the store holds: tables, images per split and class, embedding versions, errors.

    Examples:

        clipfuse info

        clipfuse info --db runs/store.lance --errors
    """
    result = _workspace(db, storage_option, quiet=as_json).info(errors=errors)
    if as_json:
        typer.echo(json.dumps(result.to_dict(), indent=2, default=str))
        return
    console.print(f"[bold]store[/] {result.uri}  tables: {', '.join(result.tables)}")
    console.print(f"{result.images} image rows, {result.unique_images} unique contents; "
                  + ", ".join(f"{k}: {v}" for k, v in sorted(result.per_split.items())))
    if result.labels_by_source:
        console.print("labels: " + ", ".join(f"{k} {v}" for k, v in result.labels_by_source.items()))
    if result.per_class:
        classes = Table(title=f"labeled images per class ({len(result.per_class)} classes)")
        classes.add_column("class")
        classes.add_column("labeled", justify="right")
        for name, n in result.per_class.items():
            classes.add_row(name, str(n))
        console.print(classes)
    versions = Table(title="embedding versions")
    for col in ("active", "fingerprint", "model", "pretrained", "precision", "decode", "dim", "rows", "source"):
        versions.add_column(col)
    for v in result.versions:
        model_name = escape(v.model) + (" [red](random weights)[/]" if v.random_weights else "") \
            + (" (image-only)" if v.image_only else "")
        versions.add_row("*" if v.fingerprint == result.active else "", v.fingerprint, model_name,
                         escape(v.pretrained or ""), v.precision, v.decode, str(v.dim), str(v.rows), v.source or "")
    console.print(versions)
    for e in result.ensembles:
        accuracy = "" if e["fused_accuracy"] is None else f", fused validation accuracy {e['fused_accuracy']:.3f}"
        state = f" [yellow]stale: {escape(e['stale'])}[/]" if e["stale"] else f": --versions {e['names']}"
        console.print(f"ensemble over versions {e['names']} ({e['heads']} heads{accuracy}){state}", highlight=False)
    console.print(f"index errors: {result.errors}" + ("" if errors or not result.errors else "  (list them with --errors)"))
    for e in result.error_list or []:
        console.print(f"  {escape(e['path'])}: {escape(e['reason'])}", highlight=False)


@app.command("label")
@_runtime_errors
def label(
    image: Annotated[Optional[str], typer.Argument(
        metavar="ID_OR_PATH", help="The image: its id, or a path the store holds.", show_default=False)] = None,
    class_name: Annotated[Optional[str], typer.Argument(
        metavar="CLASS", help="Its class (a new name adds a class).", show_default=False)] = None,
    from_csv: Annotated[Optional[Path], typer.Option(
        "--from-csv", help="CSV with columns id (or path) and label (an empty label skips the row; a remove column "
        "set to true takes the label away). All rows or none.",
        show_default=False)] = None,
    remove: Annotated[bool, typer.Option("--remove", help="Take the image's label away: it is not trained on.")] = False,
    history: Annotated[bool, typer.Option("--history", help="Show every label change (of ID_OR_PATH, if given).")]
    = False,
    as_json: Annotated[bool, typer.Option("--json", help="With --history: print JSON.")] = False,
    db: DbOpt = Path("clipfuse.lance"),
    storage_option: StorageOpt = None,
):
    """Set an image's label by hand; it wins over its folder's for training (the folder stays).

    Every change is kept (--history). Run train-heads afterwards to train on the new labels.

    Examples:

        clipfuse label data/pool/0042.jpg cat

        clipfuse label 3f2a9c0d1e5b47a8b6c4d2e0f1a3b5c7 dog

        clipfuse label --from-csv fixes.csv

        clipfuse label data/train/cat/007.jpg --remove
    """
    if history and (class_name is not None or remove or from_csv is not None):
        raise typer.BadParameter("--history shows labels; it takes no CLASS, --remove or --from-csv (run the "
                                 "change and --history separately).", param_hint="--history")
    if as_json and not history:
        raise typer.BadParameter("--json goes with --history.", param_hint="--json")
    ws = _workspace(db, storage_option, quiet=as_json)
    if history:
        rows = ws.label_history(image)
        if as_json:
            typer.echo(json.dumps(rows, indent=2, default=str))
            return
        table = Table(title=f"label history ({len(rows)} changes)")
        for col in ("when", "image", "label", "source"):
            table.add_column(col)
        for h in rows:
            when = datetime.fromtimestamp(h["at"]).strftime("%Y-%m-%d %H:%M:%S")
            table.add_row(when, escape(h["path"] or h["id"]), escape(h["label"]) if h["label"] else "(no label)",
                          h["source"])
        console.print(table)
        return
    result = ws.label(image, class_name, from_csv=from_csv, remove=remove)
    for c in result.changes[:20]:
        before = c.before if c.before is not None else "(no label)"
        after = c.after if c.after is not None else "(no label)"
        console.print(f"{escape(c.path)}: {escape(before)} -> {escape(after)}", highlight=False)
    if len(result.changes) > 20:
        console.print(f"... and {len(result.changes) - 20} more")
    if result.new_classes:
        console.print(f"new classes: {', '.join(escape(c) for c in result.new_classes)}")
    if result.unchanged:
        console.print(f"{result.unchanged} row(s) set a label the image already had: nothing to write for them")
    test = sum(1 for c in result.changes if c.split == "test")
    trained = len(result.changes) - test
    parts = [f"labeled {len(result.changes)} image(s)"]
    if trained:
        parts.append(f"run `clipfuse train-heads` to train on {'them' if not test else f'the {trained} not in test'}")
    if test:
        parts.append(f"{test} test image(s): their labels change what they are scored against, never training")
    console.print("; ".join(parts))


@app.command("serve")
@_runtime_errors
def serve(
    host: Annotated[str, typer.Option(help="Address to listen on. Anything but loopback needs a token.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on.")] = 8765,
    token: Annotated[Optional[str], typer.Option(help="Token every request must carry (made and printed when "
                                                "--host is not loopback and none is given).", show_default=False)]
    = None,
    open_browser: Annotated[bool, typer.Option("--open", help="Open the app in the default browser.")] = False,
    heads: Annotated[Optional[str], typer.Option(help="Heads Retrain trains (as train-heads --heads; default: all "
                                                "that apply).", show_default=False)] = None,
    folds: Annotated[int, typer.Option(min=2, help="Folds of Retrain's out-of-fold predictions.")] = 3,
    db: DbOpt = Path("clipfuse.lance"),
    storage_option: StorageOpt = None,
):
    """A local web app over the store: overview, gallery, image pages, label next, suspects, retrain.

    Binds 127.0.0.1 by default; serves only images the store holds. Label changes go to the
    store's labels table (made during a retrain, they wait for it and are never lost).

    Examples:

        clipfuse serve --open

        clipfuse serve --host 0.0.0.0 --port 9000   # prints a link with a generated token
    """
    from clipfuse.webapp import serve as run_app

    ws = _workspace(db, storage_option)
    ws._require_store()

    def ready(url, made_token):
        console.print(f"clipfuse review app for {escape(str(ws.db))}: [bold]{escape(url)}[/bold]  (Ctrl-C to stop)")

    run_app(ws, host=host, port=port, token=token, open_browser=open_browser, heads=heads, folds=folds,
            on_ready=ready)


@app.command("suggest")
@_runtime_errors
def suggest(
    n: Annotated[int, typer.Option("-n", "--n", min=1, help="How many images to suggest.")] = 100,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON: a list of {id, path, predicted, reason, ...}.")]
    = False,
    csv_out: Annotated[Optional[Path], typer.Option("--csv", help="Write the suggestions to this CSV (add a label "
                                                    "column and feed it to `clipfuse label --from-csv`).",
                                                    show_default=False)] = None,
    seed: Annotated[int, typer.Option(help="Seed of the k-means grouping.")] = 0,
    force: Annotated[bool, typer.Option("--force", help="Overwrite the --csv file if it exists.")] = False,
    version: VersionOpt = None,
    db: DbOpt = Path("clipfuse.lance"),
    storage_option: StorageOpt = None,
):
    """The images to label next (after train-heads), best first, with why each was chosen.

    Uncertain images (small fused margin), images the heads disagree on, and images in
    parts of the embedding space with few labels; one batch spans the space, is balanced
    over the predicted classes and holds no two near-duplicates.

    Examples:

        clipfuse suggest -n 50

        clipfuse suggest -n 200 --csv to-label.csv
    """
    from clipfuse.data import write_csv

    _check_csv_out(csv_out, force)
    result = _workspace(db, storage_option, quiet=as_json).suggest(n=n, version=version, seed=seed)
    if csv_out is not None:
        write_csv(csv_out, ["id", "path", "predicted", "confidence", "reason", "label"],
                  [[s.id, s.path, s.predicted, f"{s.confidence:.4f}", s.reason, ""] for s in result.suggestions])
    if as_json:
        typer.echo(json.dumps([{"id": s.id, "path": s.path, "predicted": s.predicted, "confidence": s.confidence,
                                "priority": s.priority, "reason": s.reason} for s in result.suggestions], indent=2))
        return
    table = Table(title=f"label these next ({len(result.suggestions)} of {result.candidates} unlabeled images)")
    for col in ("path", "predicted", "confidence", "why"):
        table.add_column(col)
    for s in result.suggestions:
        table.add_row(escape(s.path), escape(s.predicted), f"{s.confidence:.2f}", s.reason)
    console.print(table)
    if csv_out is not None:
        console.print(f"wrote {len(result.suggestions)} suggestions to {escape(str(csv_out))}; fill in its label "
                      f"column, then `clipfuse label --from-csv {escape(str(csv_out))}`")


@app.command("suspects")
@_runtime_errors
def suspects(
    n: Annotated[int, typer.Option("-n", "--n", min=1, help="How many to list.")] = 50,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON: suspects, conflicts and leaks.")] = False,
    csv_out: Annotated[Optional[Path], typer.Option("--csv", help="Write the suspects to this CSV.",
                                                    show_default=False)] = None,
    duplicate_threshold: Annotated[float, typer.Option(
        "--duplicate-threshold", help="Cosine at which two images count as near-duplicates.")] = 0.98,
    force: Annotated[bool, typer.Option("--force", help="Overwrite the --csv file if it exists.")] = False,
    version: VersionOpt = None,
    db: DbOpt = Path("clipfuse.lance"),
    storage_option: StorageOpt = None,
):
    """Labeled images whose label is probably wrong, most suspect first (after train-heads).

    Each label is judged by heads that never saw it (out-of-fold), through cleanlab.
    Also listed: one content or near-duplicates under two labels, and test images that
    duplicate labeled ones. Fix a label with `clipfuse label ID_OR_PATH CLASS`.

    Examples:

        clipfuse suspects -n 20

        clipfuse suspects --json > suspects.json
    """
    from clipfuse.data import write_csv

    _check_csv_out(csv_out, force)
    result = _workspace(db, storage_option, quiet=as_json).suspects(n=n, version=version,
                                                                    duplicate_threshold=duplicate_threshold)
    if csv_out is not None:
        write_csv(csv_out, ["id", "path", "given", "suggested", "score", "flagged", "reason"],
                  [[s.id, s.path, s.given, s.suggested, f"{s.score:.4f}", s.flagged, s.reason] for s in result.suspects])
    if as_json:
        typer.echo(json.dumps(result.to_dict(), indent=2, default=str))
        return
    table = Table(title=f"label suspects ({result.flagged} of {result.judged} labels flagged by cleanlab)")
    for col in ("score", "path", "given", "suggested", "why"):
        table.add_column(col)
    for s in result.suspects:
        table.add_row(f"{s.score:.3f}", escape(s.path), escape(s.given), escape(s.suggested), s.reason)
    console.print(table)
    for c in result.conflicts[:20]:
        console.print(f"[yellow]under two labels[/] ({c['cosine']:.3f}): "
                      + ", ".join(escape(str(p)) for p in c["paths"]) + f"  labels {', '.join(c['labels'])}",
                      highlight=False)
    for leak in result.leaks[:20]:
        console.print(f"[yellow]test image duplicates a labeled one[/] ({leak['cosine']:.3f}): "
                      f"{escape(str(leak['test_path']))} ~ {escape(str(leak['labeled_path']))}", highlight=False)
    if csv_out is not None:
        console.print(f"wrote {len(result.suspects)} suspects to {escape(str(csv_out))}")


@app.command("remove-version")
@_runtime_errors
def remove_version(
    version: Annotated[str, typer.Argument(help="The version to delete (fingerprint or prefix, see `clipfuse info`).")],
    db: DbOpt = Path("clipfuse.lance"),
    storage_option: StorageOpt = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
):
    """Delete one embedding version: its vectors, predictions, neighbour index and heads.

    Images, labels and the other versions stay. A saved --versions ensemble that needs
    it fails with a clear error until you train it again.

    Examples:

        clipfuse remove-version 3f2a9c0d --yes
    """
    from clipfuse.workspace import OptionError

    ws = _workspace(db, storage_option)
    try:
        v = ws.version(version)
    except OptionError as e:
        raise OptionError("VERSION", str(e)) from e
    if not yes and not typer.confirm(f"delete version {v.describe()} from {db}?", default=False):
        raise typer.Exit(1)
    r = ws.remove_version(v.fingerprint)
    console.print(f"removed version {r.removed.describe()}; active version now "
                  + (r.active[:12] if r.active else "none (index or activate one)"))


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
    storage_option: StorageOpt = None,
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
    r = _workspace(db, storage_option).import_embeddings(source, metadata=metadata, image_root=image_root, split=split.value,
                                         model=model, pretrained=pretrained, device=device)
    console.print(f"imported {r.rows} vectors ({r.dim}-d) for {r.images} images as version {r.fingerprint} "
                  f"({r.hashed} ids hashed from files) into {db}")


# ---- classifier stack ---------------------------------------------------------------------------
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


def _print_training(result) -> None:
    title = f"validation ({result.n_val} held-out labels; heads trained on {result.n_train})"
    if not result.n_val:
        pass  # one label per class: nothing held out, nothing to tabulate
    elif result.versions:
        _print_cross_training(result, title)
    else:
        console.print(_scores_table(title, result.scores, result.weights, result.fit_seconds))
    for head, why in result.unavailable.items():
        console.print(f"[yellow]{escape(head)} skipped:[/] {escape(why)}", highlight=False, soft_wrap=True)
    best = result.best_head
    if best is None:
        console.print(f"trained {len(result.heads)} heads into {result.folder} on {result.n_train} labels, one per "
                      "class: none could be held out, so the fused predictions are the graph head's (Poisson "
                      "learning); label a second image of some classes for held-out scores and a learned fusion")
        return
    console.print(f"trained {len(result.heads)} heads into {result.folder}: fused validation accuracy "
                  f"{result.fused_accuracy:.3f} (best single head: {best} {result.scores[best]['accuracy']:.3f}; "
                  f"fusion rule {result.fusion_rule})")


def _print_cross_training(result, title: str) -> None:
    """One section per version: its heads (weight, scores), then its heads fused alone; the ensemble last."""
    table = Table(title=title)
    for col in ("version", "head", "accuracy", "macro-F1", "NLL", "ECE", "fusion weight", "fit s"):
        table.add_column(col, justify="left" if col in ("version", "head") else "right")

    def cells(s: dict) -> list[str]:
        return [f"{s['accuracy']:.3f}", f"{s['macro_f1']:.3f}", f"{s['nll']:.3f}", f"{s['ece']:.3f}"]

    for fp in result.versions:
        short = fp[:12]
        for member in [h for h in result.heads if h.startswith(short + "/")]:
            table.add_row(short, member.split("/", 1)[1], *cells(result.scores[member]),
                          f"{result.weights[member]:.3f}", f"{result.fit_seconds.get(member, 0.0):.1f}")
        if short in result.version_scores:
            table.add_row(short, "[italic]its heads fused alone[/]", *cells(result.version_scores[short]), "", "")
        table.add_section()
    table.add_row("all", "[bold]fused[/]", *cells(result.scores["fused"]), "", "")
    console.print(table)


@app.command("train-heads")
@_runtime_errors
def train_heads(
    db: DbOpt = Path("clipfuse.lance"),
    storage_option: StorageOpt = None,
    version: VersionOpt = None,
    versions: VersionsOpt = None,
    heads: HeadsOpt = None,
    class_words: Annotated[Optional[list[Path]], typer.Option(
        exists=True, dir_okay=False, help="YAML/JSON file mapping class -> words or phrases for the zero-shot "
        "prompts (default: the folder names). Repeat it for several word lists: one zero-shot head per file, "
        "named after it.")] = None,
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
    out-of-fold predictions. Prints the validation table. `--versions` fits the heads on
    each of several versions of the same images (e.g. two finetuned CLIP models, each
    re-embedded) and learns one fusion over all of them.

    Examples:

        clipfuse train-heads

        clipfuse train-heads --heads propagation,knn,probe --class-words words.yaml

        clipfuse train-heads --class-words names.yaml --class-words descriptions.yaml

        clipfuse train-heads --versions 3f2a9c0d,8b1e4f27
    """
    with _Bars() as bars:
        result = _workspace(db, storage_option).train_heads(
            version=version, versions=versions, heads=heads, class_words=class_words or None, val_fraction=val_fraction, seed=seed,
            folds=folds, graph=graph, probe_zero_shot_prior=probe_zero_shot_prior, device=device, progress=bars)
    _print_training(result)


@app.command()
@_runtime_errors
def predict(
    db: DbOpt = Path("clipfuse.lance"),
    storage_option: StorageOpt = None,
    version: VersionOpt = None,
    versions: VersionsOpt = None,
    heads: HeadsOpt = None,
    per_head: Annotated[bool, typer.Option(
        "--per-head", help="Also write each head's probabilities (a probs_<head> column per head) into the table.")] = False,
):
    """Run the trained heads and fusion over every image; write the predictions table.

    Images indexed after `train-heads` are predicted too (propagation answers for them
    through their nearest fitted neighbours). `--heads` fuses a subset.

    Examples:

        clipfuse predict

        clipfuse predict --heads propagation,knn --per-head

        clipfuse predict --versions 3f2a9c0d,8b1e4f27
    """
    with err_console.status("predicting ..."):
        r = _workspace(db, storage_option).predict(version=version, versions=versions, heads=heads, per_head=per_head)
    console.print(f"predicted {r.images} images ({r.new_since_training} new since train-heads) with "
                  f"{', '.join(r.heads)}; mean confidence {r.mean_confidence:.3f}; table {r.table} in {db}")


@app.command()
@_runtime_errors
def evaluate(
    db: DbOpt = Path("clipfuse.lance"),
    storage_option: StorageOpt = None,
    version: VersionOpt = None,
    versions: VersionsOpt = None,
    out: Annotated[Path, typer.Option(file_okay=False, help="Folder for metrics.json, confusions.csv and the PNG "
                                      "plots.")] = Path("clipfuse-eval"),
    top_confusions: Annotated[int, typer.Option(min=0, help="Most-confused class pairs to list.")] = 10,
):
    """Score the trained heads: validation metrics per head, confusion matrix, class similarity.

    Validation scores come from heads fitted without the validation labels. When the store
    has labeled test images and `predict` has run, they are scored too. The most-confused
    class pairs (confusions.csv: both directions, class-mean similarity, example paths)
    show which class names need better words (`--class-words`).

    Examples:

        clipfuse evaluate --out eval/

        clipfuse evaluate --versions 3f2a9c0d,8b1e4f27
    """
    r = _workspace(db, storage_option).evaluate(version=version, versions=versions, out=out, top_confusions=top_confusions)
    if r.n_val:
        console.print(_scores_table(f"validation ({r.n_val} held-out labels)", r.validation, r.weights))
    if r.test is not None:
        console.print(_scores_table(f"test ({r.n_test} labeled test images, fused predictions)", {"fused": r.test}))
    if r.n_val:
        per_class = Table(title="per-class validation accuracy (fused)")
        per_class.add_column("class")
        per_class.add_column("accuracy", justify="right")
        per_class.add_column("n", justify="right")
        for c, acc, n in zip(r.classes, r.validation["fused"]["per_class_accuracy"], r.val_counts):
            per_class.add_row(escape(c), "-" if math.isnan(acc) else f"{acc:.3f}", str(n))
        console.print(per_class)
    _print_fusion_choice(r.fusion)
    _print_priors(r.priors)
    if r.confusions:
        pairs = Table(title="most-confused class pairs (validation, fused)")
        for col in ("class a", "class b", "a as b", "b as a", "similarity", "example"):
            pairs.add_column(col, justify="right" if col in ("a as b", "b as a", "similarity") else "left")
        for p in r.confusions:
            pairs.add_row(escape(p["class_a"]), escape(p["class_b"]), str(p["a_as_b"]), str(p["b_as_a"]),
                          "-" if math.isnan(p["similarity"]) else f"{p['similarity']:.3f}",
                          escape(p["examples"][0]) if p["examples"] else "")
        console.print(pairs)
    cal = r.calibration
    if cal:
        before = "-" if cal.get("ece_before") is None else f"{cal['ece_before']:.3f}"
        console.print(f"calibration (fused, validation): ECE {before} before temperature scaling, "
                      f"{cal['ece_after']:.3f} after (temperature {cal['temperature']:.2f}, fitted out of fold)")
    head = (f"fused validation accuracy {r.validation['fused']['accuracy']:.3f}" if r.n_val
            else "no held-out labels to score")
    console.print(head + "; wrote " + ", ".join(p.name for p in r.files) + f" to {out}")


def _print_fusion_choice(fusion: dict) -> None:
    """How the fusion rule was chosen: each rule's nested cross-validated score over every label."""
    rule, scores = fusion.get("rule"), fusion.get("rule_scores") or {}
    if rule == "graph-head":
        console.print("fusion: the graph head alone (no label could be held out to choose by)")
    elif scores:
        parts = ", ".join(f"{k} {v['accuracy']:.3f}" for k, v in scores.items())
        n = next(iter(scores.values()))["rows"]
        console.print(f"fusion: {rule} (nested cross-validated accuracy over {n} labels, each fused by rules "
                      f"fitted without it: {parts})")


def _print_priors(priors: dict, top: int = 5) -> None:
    """The pool's estimated class proportions beside the labels', largest differences first."""
    if not priors:
        return
    labels, pool = priors["labels"], priors["pool"]
    moved = sorted(pool, key=lambda c: -abs(pool[c] - labels[c]))[:top]
    applied = ("applied to the predictions" if priors.get("applied") else
               "not applied (too few held-out labels to calibrate on, or pool_priors off)")
    console.print(f"class proportions: the pool's (estimated by EM) differ from the labels' by {priors['total_variation']:.3f} "
                  f"(total variation), {applied}; most changed: "
                  + ", ".join(f"{escape(c)} {labels[c]:.3f} -> {pool[c]:.3f}" for c in moved))


@app.command()
@_runtime_errors
def export(
    path: Annotated[Path, typer.Argument(dir_okay=False, help="CSV file to write, e.g. predictions.csv.")],
    db: DbOpt = Path("clipfuse.lance"),
    storage_option: StorageOpt = None,
    version: VersionOpt = None,
    versions: VersionsOpt = None,
    split: Annotated[ExportSplit, typer.Option(help="Images to export: unlabeled, test or all.")] = ExportSplit.unlabeled,
    probs: Annotated[bool, typer.Option("--probs", help="Add one probability column per class.")] = False,
    format: Annotated[ExportFormat, typer.Option(
        "--format", help="clipfuse: path,id,label,confidence; kaggle: id,label with id = the file name without "
        "extension (a competition submission).")] = ExportFormat.clipfuse,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing file.")] = False,
    raw_cells: Annotated[bool, typer.Option(
        "--raw-cells", help="Write text cells exactly as stored, even ones a spreadsheet would run as a formula "
        "(for programs that read the CSV; never open such a file in a spreadsheet).")] = False,
    min_confidence: Annotated[Optional[float], typer.Option(
        "--min-confidence", min=0.0, max=1.0, help="Write the abstain label for images less confident than this.",
        show_default=False)] = None,
    target_precision: Annotated[Optional[float], typer.Option(
        "--target-precision", min=0.0, max=1.0, help="Pick --min-confidence from validation: the lowest threshold "
        "whose kept validation images are right this often (e.g. 0.95); it is printed.", show_default=False)] = None,
    ood_threshold: Annotated[Optional[float], typer.Option(
        "--ood-threshold", min=0.0, max=1.0, help="Write the abstain label for images whose OOD score (0-1: the "
        "share of the pool that looks less out of distribution) is above this.", show_default=False)] = None,
    ood_fraction: Annotated[Optional[float], typer.Option(
        "--ood-fraction", min=0.0, max=1.0, help="Write the abstain label for this share of the exported images, "
        "the most out of distribution (e.g. 0.05); not with --ood-threshold.", show_default=False)] = None,
    abstain_label: Annotated[str, typer.Option(
        "--abstain-label", help="Label written where clipfuse abstains.")] = "unknown",
):
    """Write the predictions as a CSV: path, id, label, confidence, ood [, one column per class].

    One row per image file of the chosen split, in path order, ready for a Kaggle-style
    submission (`--format kaggle`: id,label). Run `clipfuse predict` first. Text cells
    (and headers) that start with = + - @ or a tab get a leading ' so that a spreadsheet
    shows them instead of running them (CSV injection); --raw-cells turns that off.

    Examples:

        clipfuse export predictions.csv --split test

        clipfuse export submission.csv --split test --format kaggle

        clipfuse export all.csv --split all --probs --force

        clipfuse export sure.csv --target-precision 0.95

        clipfuse export known.csv --ood-fraction 0.05 --min-confidence 0.5
    """
    r = _workspace(db, storage_option).export(
        path, version=version, versions=versions, split=split.value, probs=probs, force=force, raw_cells=raw_cells,
        format=format.value, min_confidence=min_confidence, abstain_label=abstain_label,
        target_precision=target_precision, ood_threshold=ood_threshold, ood_fraction=ood_fraction)
    out = err_console if r.streamed else console  # a CSV streamed to stdout gets no summary line mixed in
    if r.threshold_coverage is not None:
        out.print(f"threshold {r.threshold:.4f} for precision {target_precision:g}: on validation it keeps "
                  f"{r.threshold_coverage:.1%} of the images, right {r.threshold_precision:.1%} of the time")
    rules = []
    if r.threshold is not None:
        rules.append(f"{r.abstained_confidence} below confidence {r.threshold:.4f}")
    if ood_threshold is not None:
        rules.append(f"{r.abstained_ood} with ood above {ood_threshold:.4f}")
    elif ood_fraction is not None:
        rules.append(f"the {r.abstained_ood} most out of distribution"
                     + (f" (ood from {r.ood_threshold:.4f})" if r.ood_threshold is not None else ""))
    both = f": {r.abstained} in all" if len(rules) > 1 else ""
    out.print(f"wrote {r.rows} rows ({r.split}) to {escape(str(path))}"
              + (f"; {' and '.join(rules)}{both} as {abstain_label!r}" if rules else ""), highlight=False)


# ---- finetuning ----------------------------------------------------------------------------------
@app.command()
@_runtime_errors
def finetune(
    db: DbOpt = Path("clipfuse.lance"),
    storage_option: StorageOpt = None,
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
    with _Bars() as bars:
        r = _workspace(db, storage_option).finetune(
            version=version, out=out, epochs=epochs, lr=lr, wd=wd, batch_size=batch_size, augment=augment,
            train_text=train_text, freeze_backbone=freeze_backbone, mean_teacher=mean_teacher,
            class_words=class_words, patience=patience, seed=seed, pseudo_labels=pseudo_labels,
            pseudo_min_confidence=pseudo_min_confidence, device=device, progress=bars)
    for h in r.history:
        console.print(f"epoch {h['epoch']}: train loss {h['train_loss']:.4f}, val accuracy {h['val_accuracy']:.3f} "
                      f"({h['seconds']:.0f} s)", highlight=False)
    console.print(f"finetuned on {r.train_images} images: validation accuracy {r.start_accuracy:.3f} "
                  f"({r.start_name}) -> {r.best_accuracy:.3f} (epoch {r.best_epoch}); model in {out}. "
                  f"Next: clipfuse wise-ft --checkpoint {out}")


@app.command("wise-ft")
@_runtime_errors
def wise_ft(
    checkpoint: Annotated[Path, typer.Option(exists=True, file_okay=False, help="Folder written by `clipfuse finetune`.")],
    db: DbOpt = Path("clipfuse.lance"),
    storage_option: StorageOpt = None,
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
    with _Bars() as bars:
        r = _workspace(db, storage_option).wise_ft(checkpoint, alphas=alphas, out=out, device=device, progress=bars)
    table = Table(title=f"WiSE-FT on {r.val_images} validation images")
    table.add_column("alpha", justify="right")
    table.add_column("val accuracy", justify="right")
    for a, acc in zip(r.alphas, r.accuracies):
        table.add_row(f"{a:g}", f"{acc:.3f}{' *' if a == r.best_alpha else ''}")
    console.print(table)
    console.print(f"best alpha {r.best_alpha:g}: validation accuracy {r.best_accuracy:.3f} "
                  f"({r.start_name} {r.start_accuracy:.3f}); model in {r.out}, curve in {r.curve}. "
                  f"Next: clipfuse reembed --model-checkpoint {r.out}")


def _print_reembed(r) -> None:
    _print_index_summary(r, activation_notice=False)
    kept = f"; previous version {r.previous[:12]} is kept (select it with --version)" if r.previous else ""
    console.print(f"re-embedded {r.summary.embedded} images ({r.summary.unchanged} already done) as version "
                  f"{r.fingerprint[:12]}, now active{kept}.")


@app.command()
@_runtime_errors
def reembed(
    model_checkpoint: Annotated[Path, typer.Option(exists=True, file_okay=False,
                                                   help="Model folder from `clipfuse finetune` or `wise-ft`.")],
    db: DbOpt = Path("clipfuse.lance"),
    storage_option: StorageOpt = None,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = None,
    decode: DecodeOpt = None,
    batch_size: BatchOpt = 32,
    workers: WorkersOpt = None,
    commit_every: CommitOpt = 512,
    max_file_size: MaxFileOpt = 512,
):
    """Embed every image of the store with a finetuned model, as a new embedding version.

    The previous version stays active and queryable until the new one is complete, then
    the new one becomes active. A killed run resumes where it stopped.

    Examples:

        clipfuse reembed --model-checkpoint models/ft-wiseft
    """
    with _Bars(rate=True) as bars:
        r = _workspace(db, storage_option).reembed(
            model_checkpoint, device=device, precision=precision and precision.value, decode=decode and decode.value,
            batch_size=batch_size, workers=workers, commit_every=commit_every, max_file_size=max_file_size,
            progress=bars)
    _print_reembed(r)


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
    from clipfuse.workspace import run_demo

    console.rule("[bold]clipfuse demo")
    console.print(f"writing sklearn digits to {workdir}: labeled/ (15 per class), unlabeled/, unlabeled_labels.csv")
    with _Bars(rate=True) as bars:
        r = run_demo(workdir, model=model, pretrained=pretrained, unlabeled=unlabeled, device=device,
                     batch_size=batch_size, k=k, finetune=with_finetune, on_notice=_show_notice, progress=bars)
    console.print(f"model: [bold]{r.index.model}[/]", highlight=False)
    _print_index_summary(r.index)
    table = Table(title=f"{k} nearest neighbours of {Path(r.query).name} (true class: {r.query_class})")
    for col in ("rank", "path", "label / true class", "similarity"):
        table.add_column(col, overflow="fold")
    for n, cls in zip(r.neighbors.neighbors, r.neighbor_classes):
        table.add_row(str(n.rank), os.path.relpath(n.paths[0]) if n.paths else "",
                      f"{cls}{'' if n.label else ' (unlabeled)'}", f"{n.similarity:.4f}")
    console.print(table)
    agree = sum(c == r.query_class for c in r.neighbor_classes)
    console.print(f"{agree} of {len(r.neighbor_classes)} neighbours are of the query's true class ({r.query_class}).")
    for i, (training, accuracy) in enumerate(zip(r.training, r.unlabeled_accuracy)):
        if i == 1:
            console.rule("[bold]finetune -> WiSE-FT -> reembed -> train-heads")
            console.print(f"finetuned: validation accuracy {r.finetune.start_accuracy:.3f} ({r.finetune.start_name}) "
                          f"-> {r.finetune.best_accuracy:.3f}; WiSE-FT best alpha {r.wise_ft.best_alpha:g} "
                          f"({r.wise_ft.best_accuracy:.3f})")
            _print_reembed(r.reembed)
        else:
            console.rule("[bold]classifier heads")
        _print_training(training)
        scores = Table(title="unlabeled images")
        scores.add_column("head")
        scores.add_column("accuracy", justify="right")
        for head, acc in accuracy.items():
            scores.add_row(f"[bold]{head}[/]" if head == "fused" else head, f"{acc:.3f}")
        console.print(scores)
        console.print(f"accuracy on the {r.unlabeled_scored} unlabeled demo images, against their true classes "
                      "in unlabeled_labels.csv")
    console.print(f"wrote {r.exported.rows} rows (unlabeled) to {r.exported.path}")
    active = r.reembed or r.index
    console.print(f"demo done: {r.index.summary.found} images in {r.db} (active version {active.fingerprint}, "
                  f"{active.model}{', RANDOM weights' if r.index.random_weights else ''}). "
                  f"Try: clipfuse neighbors {os.path.relpath(r.query)} --db {r.db}; clipfuse evaluate --db {r.db}")


if __name__ == "__main__":
    app()
