"""Benchmark: end-to-end index throughput against the model's own forward throughput.

Writes a folder of synthetic JPEG photos, then measures in one process, at one batch size
and one torch thread count:

(a) model: ``embedder.encode_pixels`` on already-preprocessed tensors (the ceiling), and
(b) index: ``clipfuse.store.index_images`` over the JPEG folder into a fresh store
    (read + hash + decode + resize in the DataLoader worker, forward, LanceDB commits,
    activation and compaction), images/s = embedded / wall time of the call.

Runs are interleaved (model, index, model, ...) so that drift of a noisy machine hits both
alike; the model figure is the mean of the model runs around the index runs. The pipeline's
job is to lose nothing around the model, so the target is index / model >= 0.90.

    python bench/index_throughput.py --n 256 --batch-size 32
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from clipfuse.data import scan_folders
from clipfuse.embed import EmbedderConfig, create_embedder, read_image
from clipfuse.store import Store, index_images

TARGET_RATIO = 0.90
QUIET_LOAD = 0.05  # foreign CPU share above which a run counts as disturbed


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=256, help="number of JPEG photos to generate and index")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass (both measurements)")
    p.add_argument("--model", default="ViT-B-32", help="open_clip model name, or an image-only backbone (timm:<name>, "
                   "effnet-lite0); random weights: speed does not depend on them")
    p.add_argument("--workers", type=int, default=None,
                   help="DataLoader worker processes; default: the embedder's own default")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads; default: torch's default")
    p.add_argument("--rounds", type=int, default=2,
                   help="index runs; the order is model, (index, model) x rounds")
    p.add_argument("--width", type=int, default=640, help="photo width in pixels")
    p.add_argument("--height", type=int, default=480, help="photo height in pixels")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated photos")
    return p.parse_args(argv)


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """Low-frequency noise in [0, 1): a coarse random grid upsampled bicubically."""
    coarse = (rng.random((cells, cells * w // h + 1)) * 255).astype(np.uint8)
    return np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC), dtype=np.float32) / 255.0


def make_photo(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    """A photo-like RGB image: a colour gradient, soft blobs at two scales and sensor noise."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(angle) * xx / w + np.sin(angle) * yy / h + 1) / 2  # 0..1 along a random direction
    low, high = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    img = low + (high - low) * ramp[..., None]
    for cells, amp in ((4, 80.0), (24, 35.0)):
        img += np.stack([_smooth_noise(rng, h, w, cells) for _ in range(3)], axis=-1) * amp - amp / 2
    img += rng.normal(0, 9.0, img.shape)  # sensor noise: keeps file sizes photo-like
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


def write_photos(folder: Path, n: int, *, width: int, height: int, seed: int) -> int:
    """Write ``n`` JPEGs (quality 90) into ``folder``; return their total size in bytes."""
    rng = np.random.default_rng(seed)
    total = 0
    for i in range(n):
        path = folder / f"photo_{i:05d}.jpg"
        make_photo(rng, width, height).save(path, quality=90)
        total += path.stat().st_size
    return total


def preprocess_all(embedder, paths: list[str], batch_size: int) -> list[torch.Tensor]:
    """Decode and preprocess every file up front, stacked in batches of ``batch_size``."""
    tensors = [embedder.preprocess(read_image(p)[1]) for p in paths]
    return [torch.stack(tensors[s:s + batch_size]) for s in range(0, len(tensors), batch_size)]


class CpuMeter:
    """Share of the machine's CPU used by *other* processes while a block runs.

    This machine is shared and small: another process on one of its cores halves the model's
    speed. Busy time comes from /proc/stat, ours from getrusage (self + reaped DataLoader
    workers); the difference, over wall time x cores, is the foreign load. NaN off Linux.
    """

    def __enter__(self):
        self._start = self._sample()
        return self

    def __exit__(self, *exc):
        wall, busy, ours = (b - a for a, b in zip(self._start, self._sample()))
        self.foreign = max(0.0, busy - ours) / (wall * (os.cpu_count() or 1)) if busy == busy else float("nan")
        return False

    @staticmethod
    def _sample() -> tuple[float, float, float]:
        ours = sum(getattr(resource.getrusage(who), f) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
                   for f in ("ru_utime", "ru_stime"))
        try:
            with open("/proc/stat") as f:
                ticks = [int(v) for v in f.readline().split()[1:]]
            busy = (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # minus idle, iowait
        except (OSError, ValueError, IndexError):
            busy = float("nan")
        return time.perf_counter(), busy, ours


def time_model(embedder, batches: list[torch.Tensor]) -> tuple[float, float]:
    """Images/s of ``encode_pixels`` over pre-made batches, and the foreign CPU load meanwhile."""
    with CpuMeter() as cpu:
        started = time.perf_counter()
        n = sum(len(embedder.encode_pixels(b)) for b in batches)
        seconds = time.perf_counter() - started
    return n / seconds, cpu.foreign


def time_index(embedder, files, classes, workdir: Path, name: str) -> tuple[float, float, int, float]:
    """Index ``files`` into a fresh store; return (images/s, foreign load, embedded, seconds)."""
    store = Store(workdir / name)
    with CpuMeter() as cpu:
        started = time.perf_counter()
        summary = index_images(store, embedder, files, classes)
        seconds = time.perf_counter() - started
    if summary.errors:
        raise RuntimeError(f"{len(summary.errors)} files failed to index, first: {summary.errors[0]}")
    return summary.embedded / seconds, cpu.foreign, summary.embedded, seconds


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    config = EmbedderConfig(model=args.model, random_weights=True,
                            batch_size=args.batch_size, workers=args.workers, device="cpu")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="RANDOM WEIGHTS")
        embedder = create_embedder(config)

    with tempfile.TemporaryDirectory(prefix="clipfuse-bench-") as tmp:
        tmp = Path(tmp)
        photos = tmp / "photos"
        photos.mkdir()
        started = time.perf_counter()
        size = write_photos(photos, args.n, width=args.width, height=args.height, seed=args.seed)
        folders = scan_folders(labeled=None, unlabeled=photos)
        paths = [f.path for f in folders.files]
        print(f"wrote {len(paths)} JPEGs {args.width}x{args.height} q90, {size / len(paths) / 1024:.0f} KiB each, "
              f"in {time.perf_counter() - started:.1f} s")
        batches = preprocess_all(embedder, paths, args.batch_size)

        print(f"model {args.model} ({'random' if embedder.info.random_weights else 'pretrained'} weights), device cpu, batch size {args.batch_size}, "
              f"torch threads {torch.get_num_threads()}, DataLoader workers {embedder.workers}, "
              f"cpu cores {os.cpu_count()}")
        # Warm-up: one forward batch, and one small index run (imports, LanceDB, worker fork).
        embedder.encode_pixels(batches[0])
        time_index(embedder, folders.files[:args.batch_size], folders.classes, tmp, "store-warmup")

        model_rates, index_rates, foreign = [], [], []

        def run_model(i: int) -> None:
            rate, load = time_model(embedder, batches)
            model_rates.append(rate)
            foreign.append(load)
            print(f"  model run {i}: {rate:6.2f} img/s   (foreign CPU load {load:4.0%})")

        run_model(1)
        for r in range(args.rounds):
            rate, load, embedded, seconds = time_index(embedder, folders.files, folders.classes, tmp, f"store-{r}")
            index_rates.append(rate)
            foreign.append(load)
            print(f"  index run {r + 1}: {rate:6.2f} img/s   (foreign CPU load {load:4.0%}; "
                  f"{embedded} embedded in {seconds:.2f} s)")
            run_model(r + 2)

    model, index = statistics.mean(model_rates), statistics.mean(index_rates)
    ratio = index / model
    # Each index run against the mean of the model runs just before and after it.
    paired = [index_rates[r] / statistics.mean(model_rates[r:r + 2]) for r in range(args.rounds)]
    print(f"model forward (encode_pixels, mean of {len(model_rates)}): {model:6.2f} img/s")
    print(f"end-to-end index_images (mean of {len(index_rates)}):     {index:6.2f} img/s")
    print(f"ratio index / model: {ratio:.3f}  (per round: {', '.join(f'{x:.3f}' for x in paired)}; "
          f"target >= {TARGET_RATIO:.2f}: {'met' if ratio >= TARGET_RATIO else 'NOT met'})")
    # foreign = [model 1, index 1, model 2, index 2, model 3, ...]: round r is foreign[2r:2r+3].
    clean = [r for r in range(args.rounds) if max(foreign[2 * r:2 * r + 3]) <= QUIET_LOAD]
    if len(clean) < args.rounds:
        print(f"WARNING: other processes used up to {max(foreign):.0%} of the CPU during timed runs; "
              f"rounds with more than {QUIET_LOAD:.0%} foreign load are disturbed.")
        if clean:
            print(f"ratio over the {len(clean)} undisturbed round(s): "
                  f"{statistics.mean(paired[r] for r in clean):.3f}")
        else:
            print("no undisturbed round: re-run on a quiet machine.")


if __name__ == "__main__":
    main()
