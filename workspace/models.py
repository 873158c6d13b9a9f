"""Which model a workflow runs, loading it, and the check that it made the version it is used with."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import warnings
from typing import Callable

from clipfuse.embed import DEFAULT_MODEL
from clipfuse.store import EmbeddingVersion, Store

from .results import Notice, OptionError

DEFAULT_DECODE = "full"  # of new versions: see bench/index_throughput.py --decode


@contextlib.contextmanager
def quiet_libraries():
    """While a model loads: open_clip and the hub client log through the root logger, and their
    failures reach the user as our own error messages instead. The levels are restored after."""
    loggers = [logging.getLogger(name) for name in (None, "open_clip", "huggingface_hub", "timm")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def check_device(device: str, precision: str = "fp32", *, model_loads: bool = True) -> None:
    """Refuse a device or precision this machine can't run before anything is loaded.

    ``model_loads=False`` (a query that may need no model) checks the name only, without torch.
    """
    from clipfuse.embed.names import check_device_name

    try:
        check_device_name(device)
        if model_loads:
            from clipfuse.embed import check_device as check

            check(device, precision)
    except ValueError as e:
        raise OptionError("--device" if "device" in str(e) else "--precision", str(e)) from e


def check_decode(decode: str | None) -> None:
    """Refuse a ``--decode`` that is not one of :data:`clipfuse.embed.names.DECODES` (None: the default)."""
    from clipfuse.embed.names import DECODES

    if decode is not None and decode not in DECODES:
        raise OptionError("--decode", f"must be {' or '.join(DECODES)}, got {decode!r}.")


def embedder_config(store: Store | None, *, model=None, pretrained=None, device="auto", precision=None,
                    decode=None, batch_size=32, workers=None, allow_random_weights=False, max_file_bytes=None):
    """Config of the model to run: the one asked for, else the store's active one (or, after a first
    run was killed before it finished, the version it was writing), else the default.

    ``precision`` / ``decode`` None: the store's model (or a ``model`` and ``pretrained`` the store has a
    version of, the newest such) keeps that version's own, so a re-index adds to it; another model gets
    fp32 and :data:`DEFAULT_DECODE`."""
    from clipfuse.embed import EmbedderConfig

    random_weights = False
    own = None
    if model is None and store is not None and not store.is_empty:
        try:
            active = store.get_version(count_rows=False)
        except LookupError:
            active = (store.versions() or [None])[-1]  # none complete yet: resume the newest
        if active is not None and not active.imported:
            model = version_model(store, active)
            pretrained = pretrained or active.pretrained
            random_weights = active.random_weights and pretrained is None  # the same random model again
            own = active
    if own is None and model is not None and store is not None and not store.is_empty:
        # --model naming a model (and weights) the store has a version of: that version's precision and decoding
        same = [v for v in store.versions() if v.model == model and (pretrained is None or v.pretrained == pretrained)]
        own = same[-1] if same else None
    if precision is None:
        precision = own.precision if own is not None else "fp32"  # a version records fp32 or int8
    if decode is None:
        decode = own.decode if own is not None else DEFAULT_DECODE
    extra = {} if max_file_bytes is None else {"max_file_bytes": max_file_bytes}
    return EmbedderConfig(model=model or DEFAULT_MODEL, pretrained=pretrained, device=device, precision=precision,
                          decode=decode, batch_size=batch_size, workers=workers,
                          allow_random_weights=allow_random_weights, random_weights=random_weights, **extra)


def load_embedder(config, *, notify: Callable[[Notice], None], progress=None):
    """The model of ``config``; a random-weights fallback (only when asked for) is announced."""
    from clipfuse.embed import create_embedder

    check_device(config.device, config.precision)

    if progress is not None:
        progress(f"loading model {config.model}", 0, None)
    with warnings.catch_warnings(), quiet_libraries():
        warnings.simplefilter("ignore")
        embedder = create_embedder(config)
    if embedder.info.random_weights:
        notify(Notice(
            f"Pretrained weights for {config.model} could not be loaded; running with RANDOM weights as asked.\n"
            "Neighbours and predictions are a smoke test only and mean nothing.\n"
            "For real results pass --pretrained /path/to/checkpoint or --model local-dir:/path/to/model, or use "
            "--model effnet-lite0 (ImageNet weights that install with clipfuse).", kind="random-weights"))
    return embedder


def _models_name(fingerprint: str) -> str:
    return f"_models/{fingerprint}"


def publish_model_folder(store: Store, fingerprint: str, folder) -> bool:
    """Keep a copy of the model folder that makes version ``fingerprint`` beside a store on S3, once, so that
    every machine can load the version's model (``reembed`` calls this before it embeds anything)."""
    import shutil
    from pathlib import Path

    if not store.uri.startswith("s3://"):
        return False
    copy = store.object_folder(_models_name(fingerprint))
    if copy.current() is not None:
        return False
    files = [p for p in Path(folder).iterdir() if p.is_file()]
    copy.replace(lambda staging: [shutil.copy2(p, staging / p.name) for p in files])
    return True


def version_model(store: Store | None, version: EmbeddingVersion) -> str:
    """The ``--model`` name that loads ``version``'s model here: its own, or, when it names a model folder this
    machine doesn't have, the store's copy of that folder (downloaded once into the cache)."""
    folder = version.model_name.folder
    if folder is None or folder.is_dir() or store is None or not store.uri.startswith("s3://"):
        return version.model
    copy = store.object_folder(_models_name(version.fingerprint)).current()
    if copy is None:
        return version.model
    return version.model.replace(str(folder), str(copy), 1)


def named_as_store_version(store: Store, embedder):
    """After loading the store's own model (``embedder_config`` without --model): when it came from the store's
    copy of a model folder, give it the name of the version it makes (see :func:`as_version_model`)."""
    if store.is_empty or not store.uri.startswith("s3://"):
        return embedder
    for version in store.versions():
        if version.model != embedder.config.model and version_model(store, version) == embedder.config.model:
            return as_version_model(embedder, version)
    return embedder


def as_version_model(embedder, version: EmbeddingVersion):
    """An embedder loaded from the store's copy of a model folder, named as the version records it: the same
    weights and preprocessing under the original name give the version's own fingerprint."""
    if embedder.config.model != version.model:
        embedder.info = dataclasses.replace(embedder.info, model=version.model)
    return embedder


def version_embedder(version: EmbeddingVersion, config, device: str, *, notify, progress=None, store=None,
                     trainable: bool = False):
    """The model that made ``version`` (or the one ``config`` names); fails if it has another fingerprint.

    The version's own model runs at the version's precision and decodes as it did (an int8 version's
    queries are embedded in int8, on the CPU). ``trainable``: the fp32 weights an int8 version was
    quantized from (finetuning trains those), checked against the version all the same."""
    from clipfuse.embed import EmbedderConfig

    own = config is None
    config = config or EmbedderConfig(model=version_model(store, version), pretrained=version.pretrained,
                                      device=device, random_weights=version.random_weights)
    # a --model that names the version's model runs it as the version did
    int8 = version.precision == "int8" and not trainable
    if int8 and config.device not in ("auto", "cpu"):
        raise OptionError("--device", f"embedding version {version.short} is int8, which runs on the CPU only; "
                                      "use --device cpu (or auto) for it.")
    config = dataclasses.replace(config, precision="int8" if int8 else config.precision, decode=version.decode,
                                 device="cpu" if int8 and config.device == "auto" else config.device)
    embedder = load_embedder(config, notify=notify, progress=progress)
    if own:
        embedder = as_version_model(embedder, version)
    made = dataclasses.replace(embedder.info, precision=version.precision) if trainable else embedder.info
    if made.fingerprint != version.fingerprint:
        raise ValueError(
            f"model {config.model!r} (fingerprint {embedder.fingerprint}, {embedder.dim}-d) did not make embedding "
            f"version {version.fingerprint} ({version.model}, {version.dim}-d): its vectors are not "
            "comparable. Query with the version's model, pick another version with --version, or index the "
            "images with this model first."
        )
    return embedder
