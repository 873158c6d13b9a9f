"""The clipfuse command line: builds configs, calls the library, prints results. Nothing else."""

from __future__ import annotations

import functools
import json
import logging
import os
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
    help="Few-label image classification over a store of CLIP embeddings.\n\n"
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
DbOpt = Annotated[Path, typer.Option("--db", help="LanceDB folder of the store (created on first index).")]
ModelOpt = Annotated[Optional[str], typer.Option(
    "--model", help="open_clip model: a built-in name (ViT-B-32), `hf-hub:org/repo` or `local-dir:/path`. "
    "Default: the store's model, else ViT-B-32.")]
PretrainedOpt = Annotated[Optional[str], typer.Option(
    "--pretrained", help="open_clip pretrained tag (laion2b_s34b_b79k) or a local checkpoint file "
    "(.safetensors / .pt); ignored for hf-hub: and local-dir: models.")]
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
    from clipfuse.store import Store

    if must_exist and not db.exists():
        raise FileNotFoundError(f"no store at {str(db)!r}; run `clipfuse index ... --db {db}` first, "
                                "or pass the right --db.")
    return Store(db)


def _embedder_config(store, *, model, pretrained, device, precision, batch_size, workers, allow_random):
    """Config of the model to run: the one asked for, else the store's active one, else the default."""
    from clipfuse.embed import DEFAULT_MODEL, DEFAULT_PRETRAINED, EmbedderConfig

    if model is None and store is not None and not store.is_empty:
        try:
            active = store.get_version()
        except LookupError:
            active = None
        if active is not None and not active["model"].startswith("imported:"):
            model = active["model"]
            pretrained = pretrained or active["pretrained"]
            allow_random = allow_random or bool(active["random_weights"])
    if model is None:
        model, pretrained = DEFAULT_MODEL, pretrained or DEFAULT_PRETRAINED
    return EmbedderConfig(model=model, pretrained=pretrained, device=device, precision=precision,
                          batch_size=batch_size, workers=workers, allow_random_weights=allow_random)


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
        "For real results pass --pretrained /path/to/checkpoint or --model local-dir:/path/to/model.",
        title="RANDOM WEIGHTS", border_style="bold red"))


class _RateColumn(ProgressColumn):
    def render(self, task) -> Text:
        return Text(f"{task.speed:,.1f} img/s" if task.speed else "-- img/s", style="progress.data.speed")


def _progress() -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), _RateColumn(),
                    TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=err_console)


def _run_index(store, embedder, folders, *, commit_every: int = 512):
    from clipfuse.store import IndexConfig, index_images

    with _progress() as progress:
        task = progress.add_task("indexing", total=len(folders.files))
        summary = index_images(store, embedder, folders.files, folders.classes, roots=folders.roots,
                               config=IndexConfig(commit_every=commit_every),
                               progress=lambda done, total: progress.update(task, completed=done))
    return summary


def _print_index_summary(summary, db: Path, *, show_errors: int = 20) -> None:
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
    store = _open_store(db, must_exist=False)
    folders = scan_folders(labeled_dir, unlabeled=unlabeled, test=test,
                           known_classes=None if store.is_empty else store.classes())
    config = _embedder_config(store, model=model, pretrained=pretrained, device=device, precision=precision.value,
                              batch_size=batch_size, workers=workers, allow_random=allow_random_weights)
    embedder = _load_embedder(config)
    summary = _run_index(store, embedder, folders, commit_every=commit_every)
    _print_index_summary(summary, db)
    console.print(f"indexed {summary.embedded} new, {summary.unchanged} unchanged, {summary.duplicates} duplicates, "
                  f"{len(summary.errors)} errors into {db}")


def _resolve_query(store, version: dict, query: Optional[str], text: Optional[str], model_config=None,
                   device: str = "auto"):
    """Return (query vector (1, dim), description) for an image file, an id or a text.

    ``model_config`` names the model to embed the query with; None means the version's own.
    """
    from clipfuse.data import IMAGE_EXTENSIONS, hash_bytes

    if text is not None:
        if version["model"].startswith("imported:"):
            raise ValueError(f"version {version['fingerprint']} was imported without a model, so texts can't be "
                             "embedded for it; re-import with --model, or query by image id.")
        embedder = _query_embedder(version, model_config, device)
        return embedder.encode_texts([text]), f"text {text!r}"
    path = Path(query)
    if path.is_file():
        id_ = hash_bytes(path.read_bytes())
        if model_config is None and id_ in store.embedded_ids(version["fingerprint"]):
            return store.vectors_for([id_], version["fingerprint"]), f"{path} (id {id_}, stored vector)"
        if version["model"].startswith("imported:"):
            raise ValueError(f"{path} is not in imported version {version['fingerprint']} and the version has no "
                             "model to embed it with; re-import with --model.")
        from clipfuse.embed import read_image

        embedder = _query_embedder(version, model_config, device)
        record, img = read_image(str(path))
        if img is None:
            raise ValueError(f"can't read query image {str(path)!r}: {record.error}.")
        return embedder.encode_images([img]), f"{path} (embedded now)"
    if not path.exists() and (path.suffix.lower() in IMAGE_EXTENSIONS or os.sep in query):
        raise FileNotFoundError(f"query image {query!r} does not exist; pass an existing image file or an image id.")
    return store.vectors_for([query], version["fingerprint"]), f"id {query}"


def _query_embedder(version: dict, model_config, device: str):
    """The model that made ``version``; fails if the one asked for has another fingerprint."""
    from clipfuse.embed import EmbedderConfig

    config = model_config or EmbedderConfig(model=version["model"], pretrained=version["pretrained"], device=device,
                                            allow_random_weights=bool(version["random_weights"]))
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
    store = _open_store(db)
    ver = store.get_version(version)
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
        model_name = v["model"] + (" [red](random weights)[/]" if v["random_weights"] else "")
        versions.add_row("*" if v["fingerprint"] == summary["active"] else "", v["fingerprint"], model_name,
                         v["pretrained"] or "", str(v["dim"]), str(v["rows"]), v["source"] or "")
    console.print(versions)
    console.print(f"index errors: {summary['errors']}" + ("" if errors or not summary["errors"] else
                                                          "  (list them with --errors)"))
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
        "--model", help="The open_clip model that made the vectors, if it can be loaded here; enables "
        "image and text queries against them.")] = None,
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
        embedder = _load_embedder(EmbedderConfig(model=model, pretrained=pretrained, device=device))
        model_info = embedder.info.to_dict()
    store = _open_store(db, must_exist=False)
    result = run_import(store, data, model_info=model_info, image_root=image_root, split=split.value)
    console.print(f"imported {result['rows']} vectors ({data.vectors.shape[1]}-d) for {result['images']} images "
                  f"as version {result['fingerprint']} ({result['hashed']} ids hashed from files) into {db}")


@app.command()
@_runtime_errors
def demo(
    workdir: Annotated[Path, typer.Option(help="Folder for the sample images and the store.")] = Path("clipfuse-demo"),
    model: Annotated[str, typer.Option("--model", help="open_clip model to try first.")] = "ViT-B-32",
    pretrained: PretrainedOpt = "laion2b_s34b_b79k",
    device: DeviceOpt = "auto",
    batch_size: BatchOpt = 32,
    k: Annotated[int, typer.Option("-k", "--k", min=1, help="Neighbours to show.")] = 5,
):
    """Run the whole job on a real sample: sklearn's handwritten digits as PNG files.

    Writes 15 labeled images per class and the rest unlabeled into WORKDIR, indexes them
    into WORKDIR/clipfuse.lance, and shows the neighbours of an unlabeled image. Uses
    pretrained weights when they can be loaded, else says so loudly and uses random ones.

    Examples:

        clipfuse demo

        clipfuse demo --model ViT-B-32 --pretrained ~/weights/vit-b-32.safetensors
    """
    from clipfuse.data import scan_folders, write_digits_dataset
    from clipfuse.embed import EmbedderConfig, PretrainedWeightsError

    console.rule("[bold]clipfuse demo")
    paths = write_digits_dataset(workdir)
    console.print(f"wrote sklearn digits to {workdir}: labeled/ (15 per class), unlabeled/, unlabeled_labels.csv")
    db = workdir / "clipfuse.lance"
    store = _open_store(db, must_exist=False)
    config = EmbedderConfig(model=model, pretrained=pretrained, device=device, batch_size=batch_size)
    try:
        embedder = _load_embedder(config)
    except PretrainedWeightsError as e:
        err_console.print(f"[yellow]{str(e).splitlines()[0]}[/]", highlight=False, soft_wrap=True)
        embedder = _load_embedder(EmbedderConfig(**{**vars(config), "allow_random_weights": True}))
    folders = scan_folders(paths["labeled"], unlabeled=paths["unlabeled"])
    summary = _run_index(store, embedder, folders)
    _print_index_summary(summary, db)

    truth = dict(line.rstrip("\n").split(",", 1) for line in paths["truth"].read_text().splitlines()[1:])
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
    console.print(f"demo done: {summary.found} images in {db} (version {embedder.fingerprint}, "
                  f"{'RANDOM weights' if embedder.info.random_weights else embedder.config.pretrained}). "
                  f"Try: clipfuse neighbors {os.path.relpath(query_path)} --db {db}")


if __name__ == "__main__":
    app()
