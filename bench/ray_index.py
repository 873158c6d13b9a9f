"""Benchmark: index throughput of ``--ray local`` against the single-process index, on the same images.

Writes a folder of synthetic JPEG photos (as bench/index_throughput.py does), then indexes it into
fresh stores in one process, interleaved so that drift of a noisy machine hits both alike:

(a) single: ``index_images`` in this process (DataLoader worker + torch threads), and
(b) ray: ``index_images(..., ray=RayConfig(...))`` on a Ray instance already running on this machine
    (read/decode tasks, an actor pool of model replicas, shard commits through lance-ray), so the
    figure is the pipeline's steady cost, model loading in the actors included;
(c) ray, cold: the first Ray run also pays for starting Ray itself (``ray.init``), as a one-off
    ``clipfuse index --ray local`` does; reported apart.

images/s = embedded / wall time of the call. On a machine with a GPU, ``--gpus-per-worker 1`` puts
the actors on it (``--precision fp16`` / ``bf16`` there) and the single-process run uses ``cuda``.

    python bench/ray_index.py --n 512
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # the sibling benchmark's data generator
import index_throughput  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=512, help="number of JPEG photos to generate and index")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass (both runs)")
    p.add_argument("--model", default="ViT-B-32", help="open_clip model name or image backbone; random weights are "
                   "fine: speed does not depend on them")
    p.add_argument("--rounds", type=int, default=2, help="runs of each kind after the cold one")
    p.add_argument("--commit-every", type=int, default=128, help="images per shard commit (both runs)")
    p.add_argument("--ray-workers", type=int, default=None, help="model replicas (default: one per GPU, or 1)")
    p.add_argument("--gpus-per-worker", type=float, default=None, help="default: 1 with GPUs, else 0")
    p.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"])
    p.add_argument("--width", type=int, default=640)
    p.add_argument("--height", type=int, default=480)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from clipfuse.data import scan_folders
    from clipfuse.embed import EmbedderConfig, create_embedder
    from clipfuse.store import IndexConfig, Store, index_images
    from clipfuse.store.rayindex import RayConfig, connect

    photos = index_throughput
    cuda = torch.cuda.is_available()
    with tempfile.TemporaryDirectory(prefix="clipfuse-ray-bench-") as tmp:
        work = Path(tmp)
        (work / "photos").mkdir()
        photos.write_photos(work / "photos", args.n, width=args.width, height=args.height, seed=0)
        folders = scan_folders(unlabeled=work / "photos")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            logging.disable(logging.WARNING)
            local = create_embedder(EmbedderConfig(model=args.model, batch_size=args.batch_size,
                                                   device="cuda" if cuda else "cpu",
                                                   precision=args.precision if cuda else "fp32",
                                                   allow_random_weights=True))
            driver = local if not cuda else create_embedder(EmbedderConfig(
                model=args.model, batch_size=args.batch_size, device="cpu", allow_random_weights=True))
            logging.disable(logging.NOTSET)
        ray_config = RayConfig(address="local", workers=args.ray_workers, gpus_per_worker=args.gpus_per_worker,
                               precision=args.precision if cuda else "fp32")
        config = IndexConfig(commit_every=args.commit_every, build_ann=False)
        runs = {"single": [], "ray": []}
        count = iter(range(1000))

        def run(kind: str, embedder) -> float:
            store = Store(work / f"{kind}-{next(count)}.lance")
            started = time.perf_counter()
            summary = index_images(store, embedder, folders.files, folders.classes, config=config,
                                   ray=ray_config if kind != "single" else None)
            seconds = time.perf_counter() - started
            assert summary.embedded == args.n and not summary.errors, summary
            return args.n / seconds

        cold_started = time.perf_counter()
        connect("local")  # the cold run: starting Ray, then the job
        cold = run("ray", driver)
        cold_total = args.n / (time.perf_counter() - cold_started)
        for _ in range(args.rounds):
            runs["single"].append(run("single", local))
            runs["ray"].append(run("ray", driver))
        runs["single"].append(run("single", local))
        import ray

        resources = ray.cluster_resources()
        ray.shutdown()

    single, on_ray = statistics.mean(runs["single"]), statistics.mean(runs["ray"])
    device = torch.cuda.get_device_name(0) if cuda else f"CPU, {os.cpu_count()} cores"
    print(f"model {args.model}, {args.n} JPEG photos {args.width}x{args.height}, batch {args.batch_size}, "
          f"shards of {args.commit_every}; {device}; Ray: {resources.get('CPU', 0):g} CPU, "
          f"{resources.get('GPU', 0):g} GPU")
    print(f"single process : {single:7.1f} img/s  (runs: {', '.join(f'{v:.1f}' for v in runs['single'])})")
    print(f"--ray local    : {on_ray:7.1f} img/s  (runs: {', '.join(f'{v:.1f}' for v in runs['ray'])})")
    print(f"ray / single   : {on_ray / single:7.2f}   (Ray's overhead here: {1 - on_ray / single:.0%} of the single-process speed)")
    print(f"cold --ray run : {cold:7.1f} img/s for the job, {cold_total:.1f} img/s with starting Ray "
          f"({cold_total / single:.2f} of single)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
