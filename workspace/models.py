"""Which model a workflow runs, loading it, and the check that it made the version it is used with."""

from __future__ import annotations

import contextlib
import logging
import warnings
from typing import Callable

from clipfuse.embed import DEFAULT_MODEL
from clipfuse.store import EmbeddingVersion, Store

from .results import Notice, OptionError


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


def embedder_config(store: Store | None, *, model=None, pretrained=None, device="auto", precision="fp32",
                    batch_size=32, workers=None, allow_random_weights=False, max_file_bytes=None):
    """Config of the model to run: the one asked for, else the store's active one (or, after a first
    run was killed before it finished, the version it was writing), else the default."""
    from clipfuse.embed import EmbedderConfig

    random_weights = False
    if model is None and store is not None and not store.is_empty:
        try:
            active = store.get_version(count_rows=False)
        except LookupError:
            active = (store.versions() or [None])[-1]  # none complete yet: resume the newest
        if active is not None and not active.imported:
            model = active.model
            pretrained = pretrained or active.pretrained
            random_weights = active.random_weights and pretrained is None  # the same random model again
    extra = {} if max_file_bytes is None else {"max_file_bytes": max_file_bytes}
    return EmbedderConfig(model=model or DEFAULT_MODEL, pretrained=pretrained, device=device, precision=precision,
                          batch_size=batch_size, workers=workers, allow_random_weights=allow_random_weights,
                          random_weights=random_weights, **extra)


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


def version_embedder(version: EmbeddingVersion, config, device: str, *, notify, progress=None):
    """The model that made ``version`` (or the one ``config`` names); fails if it has another fingerprint."""
    from clipfuse.embed import EmbedderConfig

    config = config or EmbedderConfig(model=version.model, pretrained=version.pretrained, device=device,
                                      random_weights=version.random_weights)
    embedder = load_embedder(config, notify=notify, progress=progress)
    if embedder.fingerprint != version.fingerprint:
        raise ValueError(
            f"model {config.model!r} (fingerprint {embedder.fingerprint}, {embedder.dim}-d) did not make embedding "
            f"version {version.fingerprint} ({version.model}, {version.dim}-d): its vectors are not "
            "comparable. Query with the version's model, pick another version with --version, or index the "
            "images with this model first."
        )
    return embedder
