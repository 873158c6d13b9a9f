"""Embed an index run's files on a Ray cluster: read bytes -> decode/preprocess (CPU tasks) -> embed
(an actor pool, the model loaded once per actor) -> back to the driver, which commits shard by shard.

Only imported for ``clipfuse index --ray``; it needs ``pip install 'clipfuse[ray]'``. The driver keeps
everything that decides what the store holds (what to skip, duplicates, error rows, the commits), so
a Ray run writes exactly what a local run writes, and a killed one resumes the same way.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass, replace

import numpy as np

from clipfuse.data import is_printable
from clipfuse.embed.images import ImageRecord

_INSTALL = "pip install 'clipfuse[ray]'"


@dataclass(frozen=True)
class RayConfig:
    """Where and how an index run embeds on Ray.

    ``address``: ``"local"`` starts a Ray instance on this machine for the run (and stops it after);
    ``"auto"`` joins the cluster running here (``ray start --head`` / ``RAY_ADDRESS``); anything else
    is a cluster address (``ray://head:10001`` or ``head:6379``). A Ray that this process has already
    started (``ray.init()`` before calling the API) is used as it is.
    """

    address: str = "auto"
    workers: int | None = None  # embedding actors; None: one per GPU (gpus_per_worker each), or 1 without GPUs
    gpus_per_worker: float | None = None  # None: 1 when the cluster has GPUs, else 0 (CPU actors)
    cpus_per_worker: float = 1.0  # CPUs each actor reserves (its torch threads)
    precision: str = "fp32"  # of the actors' forward passes: fp16 / bf16 need GPU workers, int8 CPU ones


def _import_ray():
    try:
        import lance_ray  # noqa: F401  (checked here: the shard commits need it)
        import ray
    except ImportError as e:
        raise ImportError(f"--ray needs Ray Data and lance-ray: {_INSTALL} (missing: {e.name}).") from e
    return ray


def connect(address: str) -> bool:
    """Connect to (or start) Ray; True when this call started it, so the caller shuts it down after."""
    ray = _import_ray()
    if ray.is_initialized():
        return False
    if address not in ("local", "auto"):
        _check_reachable(address)
    kwargs = dict(include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False, configure_logging=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # DeprecationWarnings of the processes Ray forks
            if address == "local":
                ray.init(num_cpus=os.cpu_count() or 1, **kwargs)
            else:
                ray.init(address=address, **kwargs)
    except ConnectionError as e:
        where = "running on this machine" if address == "auto" else f"at {address!r}"
        raise ConnectionError(f"no Ray cluster {where} could be reached ({e}); start one with `ray start --head`, "
                              "pass its address with --ray ADDRESS, or use --ray local to run Ray on this machine "
                              "alone.") from e
    import ray.data

    for name in ("ray", "ray.data", "ray.util"):
        logging.getLogger(name).setLevel(logging.ERROR)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # clipfuse shows its own progress
    context.print_on_execution_start = False
    return True


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail at once, naming the address, when nothing listens there (Ray itself retries for minutes)."""
    import socket

    host_port = address.removeprefix("ray://").rstrip("/")
    host, _, port = host_port.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"--ray {address!r} is not a cluster address; give HOST:PORT (the head's GCS port, 6379 by "
                         "default), ray://HOST:PORT (Ray Client, 10001 by default), auto or local.")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except OSError as e:
        raise ConnectionError(f"no Ray cluster answers at {address!r} ({e.strerror or e}); check the head's address "
                              "and port (`ray status` on the head), or use --ray local to run Ray on this machine "
                              "alone.") from e


def write_args(store) -> dict:
    """Ray options of the tasks that write a shard's files: I/O only, so they never wait for the embedding's CPUs;
    for a store on this machine's disk they run on this machine's node (another node's disk is another disk)."""
    args = {"num_cpus": 0}
    if store.is_local:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        args["scheduling_strategy"] = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(),
                                                                     soft=False)
    return args


def check_cluster(address: str, store, local_folders: bool) -> list[str]:
    """Refuse what can't work on the connected cluster; return what the user should know."""
    import ray

    if address.startswith("ray://") and store.is_local:
        raise ValueError(f"--ray {address} runs the job on the cluster through Ray Client, which can't write the store "
                         f"{store.uri!r} on this machine's disk; put the store on s3:// (or run on the head node "
                         "with --ray auto and a store on a shared filesystem).")
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) > 1 and local_folders:
        return [f"the Ray cluster has {len(nodes)} nodes and the images are local paths: every node reads them at "
                "the same path, so they must be on a shared filesystem (or on s3://); files a node can't see become "
                "error rows."]
    return []


def disconnect() -> None:
    """Shut down the Ray instance :func:`connect` started."""
    import ray

    ray.shutdown()


def _cluster_gpus() -> float:
    import ray

    return float(ray.cluster_resources().get("GPU", 0))


def plan_workers(config: RayConfig) -> tuple[int, float]:
    """(actors, GPUs per actor) for the connected cluster."""
    gpus = _cluster_gpus()
    per = config.gpus_per_worker if config.gpus_per_worker is not None else (1.0 if gpus else 0.0)
    if per < 0:
        raise ValueError(f"--gpus-per-worker must be 0 or more, got {per}.")
    if per > 0 and gpus < per:
        raise ValueError(f"--gpus-per-worker {per:g} asked for, but the Ray cluster has {gpus:g} GPU(s); use "
                         "--gpus-per-worker 0 for CPU workers, or add GPU nodes.")
    if config.precision == "int8" and per > 0:
        raise ValueError(f"--precision int8 runs on CPU workers only, and this run gives each worker {per:g} GPU(s); "
                         "add --gpus-per-worker 0, or use --precision fp16 / bf16 on GPU workers.")
    if config.precision in ("fp16", "bf16") and per == 0:
        raise ValueError(f"--precision {config.precision} needs GPU workers, and this run has none (the cluster has "
                         f"{gpus:g} GPUs{', and --gpus-per-worker is 0' if gpus else ''}); use --precision fp32.")
    if config.workers is not None:
        if config.workers < 1:
            raise ValueError(f"--ray-workers must be at least 1, got {config.workers}.")
        return config.workers, per
    return (max(1, int(gpus // per)) if per > 0 else 1), per


# ---- the stages (run on the workers) ----------------------------------------------------------------
_RECORD_FIELDS = ("path", "id", "bytes", "mtime", "width", "height", "error")


def _read_stage(batch: dict, *, max_bytes, storage_options) -> dict:
    """Read and hash each file: the bytes (empty when unreadable) and the record's fields."""
    from clipfuse.embed.images import read_image_bytes

    out = {name: [] for name in ("pos", "data", *_RECORD_FIELDS)}
    for pos, path in zip(batch["pos"], batch["path"]):
        try:
            record, data = read_image_bytes(str(path), max_bytes=max_bytes, storage_options=storage_options)
        except Exception as e:  # whatever happens to one file never fails the task
            record, data = ImageRecord(path=str(path), error=f"could not be read: {type(e).__name__}: {e}"), None
        out["pos"].append(int(pos))
        out["data"].append(data or b"")
        _put_record(out, record)
    return {k: np.asarray(v, dtype=object) if k in ("data", "path", "id", "error") else np.asarray(v)
            for k, v in out.items()}


def _put_record(out: dict, record: ImageRecord) -> None:
    for name in _RECORD_FIELDS:
        value = getattr(record, name)
        out[name].append(("" if value is None else value) if name in ("id", "error") else value)


def _decode_stage(batch: dict, *, preprocess, max_pixels, shape, draft_size=None) -> dict:
    """Decode and preprocess the readable files into a (n, 3, H, W) float32 block."""
    from clipfuse.embed.images import decode_record
    from clipfuse.embed.pipeline import preprocess_image

    n = len(batch["pos"])
    pixels = np.zeros((n, *shape), dtype=np.float32)
    errors = list(batch["error"])
    widths, heights = list(batch["width"]), list(batch["height"])
    for i in range(n):
        if errors[i]:
            continue
        record = _record(batch, i)
        try:
            px = preprocess_image(record, decode_record(record, batch["data"][i], max_pixels=max_pixels,
                                                      draft_size=draft_size), preprocess)
        except Exception as e:  # never fail the task
            record.error, px = f"could not be decoded: {type(e).__name__}: {e}", None
        if px is None:
            errors[i] = record.error or "could not be decoded"
            continue
        pixels[i] = px.numpy()
        widths[i], heights[i] = record.width, record.height
    out = {k: v for k, v in batch.items() if k != "data"}
    out.update(pixels=pixels, error=np.asarray(errors, dtype=object), width=np.asarray(widths),
               height=np.asarray(heights))
    return out


def _record(batch: dict, i: int) -> ImageRecord:
    return ImageRecord(path=str(batch["path"][i]), id=str(batch["id"][i]) or None, bytes=int(batch["bytes"][i]),
                       mtime=float(batch["mtime"][i]), width=int(batch["width"][i]), height=int(batch["height"][i]),
                       error=str(batch["error"][i]) or None)


class EmbedActor:
    """One embedding worker: loads the model once, checks it is the driver's, embeds batch after batch."""

    def __init__(self, config, fingerprint: str, skip, named: str | None = None, per_node: int = 1):
        import ray
        import torch

        from clipfuse.embed import create_embedder

        self.skip = ray.get(skip[0])  # a reference in a list: the set is fetched here, once per actor
        if config.device == "cpu":
            # Ray gives an actor of num_cpus=1 one thread; the model may use this node's share of its cores, as a
            # local run does (the decode tasks are mostly waiting on the model, like a local run's worker)
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, per_node)))
        self.embedder = create_embedder(config)
        if named is not None and named != self.embedder.info.model:  # loaded from a store's copy of a model folder
            self.embedder.info = replace(self.embedder.info, model=named)
        if self.embedder.fingerprint != fingerprint:
            raise RuntimeError(
                f"the model {config.model!r} loaded on a Ray worker has fingerprint {self.embedder.fingerprint}, not "
                f"the driver's {fingerprint}: the workers see other weights (a different file at the same path, or "
                "another version of the model's package). Give every machine the same weights.")

    def __call__(self, batch: dict):
        import pyarrow as pa
        import torch

        errors, ids = batch["error"], batch["id"]
        embed = np.array([not errors[i] and ids[i] not in self.skip for i in range(len(ids))], dtype=bool)
        dim = self.embedder.dim
        vectors = np.zeros((len(ids), dim), dtype=np.float32)
        if embed.any():
            vectors[embed] = self.embedder.encode_pixels(torch.from_numpy(np.ascontiguousarray(batch["pixels"][embed])))
        columns = {"pos": pa.array(batch["pos"], pa.int64())}
        for name in _RECORD_FIELDS:
            values = batch[name]
            columns[name] = pa.array([str(v) for v in values] if values.dtype == object else values)
        columns["embedded"] = pa.array(embed)
        columns["vector"] = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), dim)
        return pa.table(columns)


# ---- the driver --------------------------------------------------------------------------------------
class ray_batches:
    """Iterate ``(records, {position: vector})`` for ``paths``, embedded on Ray, as batches finish.

    ``skip``: content ids the version holds already (their rows come back without a vector).
    Closing (``close()``, also after an error) shuts down a Ray instance this run started.
    """

    def __init__(self, embedder, paths: list[str], *, skip: set[str], config: RayConfig,
                 storage_options: dict | None = None):
        self._started = connect(config.address)
        try:
            self._iter = self._run(embedder, paths, skip, config, storage_options) if paths else iter(())
        except BaseException:
            self.close()
            raise

    def __iter__(self):
        return self

    def __next__(self):
        return next(self._iter)

    def close(self) -> None:
        close = getattr(self._iter, "close", None) if hasattr(self, "_iter") else None
        if close is not None:
            close()
        if self._started:
            self._started = False
            disconnect()

    @staticmethod
    def _run(embedder, paths, skip, config, storage_options):
        import ray
        import ray.data

        from .store import with_env_credentials

        workers, gpus = plan_workers(config)
        unnamed = [p for p in paths if not is_printable(p)]
        if unnamed:  # Arrow can't carry such names to the workers; the reason is the one a local run records
            yield [ImageRecord(path=p, error="file name is not valid UTF-8; rename the file") for p in unnamed], {}
            paths = [p for p in paths if is_printable(p)]
            if not paths:
                return
        base = embedder.config
        actor_config = replace(base, device="cuda" if gpus > 0 else "cpu", precision=config.precision, workers=0)
        batch_size = base.batch_size
        shape = (3, *embedder.image_size)
        items = [{"pos": i, "path": p} for i, p in enumerate(paths)]
        ds = ray.data.from_items(items, override_num_blocks=max(1, min(len(items) // batch_size, 10_000)))
        ds = ds.map_batches(_read_stage, batch_size=batch_size, batch_format="numpy", num_cpus=1,
                            fn_kwargs={"max_bytes": base.max_file_bytes,
                                       "storage_options": with_env_credentials(storage_options)})
        ds = ds.map_batches(_decode_stage, batch_size=batch_size, batch_format="numpy", num_cpus=1,
                            fn_kwargs={"preprocess": embedder.preprocess, "max_pixels": base.max_image_pixels,
                                       "shape": shape, "draft_size": embedder.draft_size})
        ds = ds.map_batches(EmbedActor, batch_size=batch_size, batch_format="numpy",
                            compute=ray.data.ActorPoolStrategy(size=workers), num_gpus=gpus,
                            num_cpus=config.cpus_per_worker,
                            fn_constructor_kwargs={"config": actor_config, "fingerprint": embedder.fingerprint,
                                                   "named": embedder.info.model,
                                                   "per_node": -(-workers // max(1, len(
                                                       [n for n in ray.nodes() if n.get("Alive")]))),
                                                   "skip": [ray.put(set(skip))]})
        dim = embedder.dim
        for table in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            cols = {name: table.column(name).to_pylist() for name in (*_RECORD_FIELDS, "embedded")}
            vectors = table.column("vector").combine_chunks().flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)
            records, found = [], {}
            for i in range(table.num_rows):
                records.append(ImageRecord(path=cols["path"][i], id=cols["id"][i] or None, bytes=cols["bytes"][i],
                                           mtime=cols["mtime"][i], width=cols["width"][i], height=cols["height"][i],
                                           error=cols["error"][i] or None))
                if cols["embedded"][i]:
                    found[i] = vectors[i]
            yield records, found
