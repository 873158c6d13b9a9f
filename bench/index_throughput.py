"""Benchmark: end-to-end index throughput against the model's own forward throughput.

Writes a folder of synthetic JPEG photos, then measures in one process, at one batch size
and one torch thread count:

(a) model: ``embedder.encode_pixels`` on already-preprocessed tensors (the ceiling), and
(b) index: ``clipfuse.store.index_images`` over the JPEG folder into a fresh store
    (read + hash + decode + resize, by threads between forward passes on CPU, forward, LanceDB commits,
    activation and compaction), images/s = embedded / wall time of the call.

Runs are interleaved (model, index, model, ...) so that drift of a noisy machine hits both
alike; the model figure is the mean of the model runs around the index runs. The pipeline's
job is to lose nothing around the model, so the target is index / model >= 0.90.

With ``--precision int8`` and/or ``--decode draft`` a second configuration (the variant) is measured
the same way, interleaved with the first (fp32, full decoding) on the same files, and compared:
index images/s of the variant / the baseline, the mean cosine of each image's two vectors and the
top-10 neighbour overlap (per image, the share of its 10 nearest neighbours both give). The CPU's
vector-instruction flags are printed with it: int8 is fastest with AVX-512 VNNI.

    python bench/index_throughput.py --n 256 --batch-size 32
    python bench/index_throughput.py --precision int8
    python bench/index_throughput.py --decode draft --width 2048 --height 1536 --model effnet-lite0
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
from clipfuse.embed import EmbedderConfig, create_embedder
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
    p.add_argument("--precision", default="fp32", choices=["fp32", "int8"],
                   help="int8: compare int8 with fp32 (speed, cosine, neighbour overlap)")
    p.add_argument("--decode", default="full", choices=["full", "draft"],
                   help="draft: compare reduced-size JPEG decoding with full decoding")
    return p.parse_args(argv)


CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_int8")


def cpu_description() -> str:
    """Model name and the vector flags that decide int8 speed, from /proc/cpuinfo."""
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        return "unknown CPU (no /proc/cpuinfo)"
    name = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "?")
    flags = set(next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []))
    return f"{name}; flags: {' '.join(f for f in CPU_FLAGS if f in flags) or 'none of ' + ', '.join(CPU_FLAGS)}"


def top_k_overlap(A: np.ndarray, B: np.ndarray, k: int = 10) -> float:
    """Mean share of each row's k nearest neighbours (cosine, itself left out) that A and B agree on."""
    def top(X):
        S = X @ X.T
        np.fill_diagonal(S, -np.inf)
        return np.argpartition(-S, k, axis=1)[:, :k]
    ta, tb = top(A), top(B)
    return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(ta, tb)]))


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
    tensors = [embedder.preprocess(embedder.read_image(p)[1]) for p in paths]  # decoded as the index decodes
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


def _rates(label: str) -> dict:
    return {"label": label, "model": [], "index": [], "foreign": []}


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    def load(precision: str, decode: str):
        config = EmbedderConfig(model=args.model, random_weights=args.model != "effnet-lite0",  # its real weights
                                batch_size=args.batch_size,
                                workers=args.workers, device="cpu", precision=precision, decode=decode)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="RANDOM WEIGHTS")
            return create_embedder(config)

    configs = [("fp32, full decoding", load("fp32", "full"))]
    if (args.precision, args.decode) != ("fp32", "full"):
        configs.append((f"{args.precision}, {args.decode} decoding", load(args.precision, args.decode)))
    print(f"cpu: {cpu_description()}; {os.cpu_count()} cores")

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
        # model-only input: each configuration's own decoding and preprocessing, made up front
        batches = [preprocess_all(e, paths, args.batch_size) for _, e in configs]
        first = configs[0][1]
        print(f"model {args.model} ({'random' if first.info.random_weights else 'pretrained'} weights), device cpu, "
              f"batch size {args.batch_size}, torch threads {torch.get_num_threads()}, "
              + (f"DataLoader workers {first.workers}" if first.workers else
                 f"no DataLoader workers: {first.decode_threads} threads read each batch between forward passes"))
        for (_, e), b in zip(configs, batches):  # warm-up: a forward batch, a small index run (imports, fork)
            e.encode_pixels(b[0])
            time_index(e, folders.files[:args.batch_size], folders.classes, tmp, f"warmup-{e.fingerprint}")

        results = [_rates(label) for label, _ in configs]

        def run_model(c: int, i: int) -> None:
            rate, load = time_model(configs[c][1], batches[c])
            results[c]["model"].append(rate)
            results[c]["foreign"].append(load)
            print(f"  [{results[c]['label']}] model run {i}: {rate:6.2f} img/s   (foreign CPU load {load:4.0%})")

        stores = {}
        for c in range(len(configs)):
            run_model(c, 1)
        for r in range(args.rounds):
            for c, (label, e) in enumerate(configs):
                rate, load, embedded, seconds = time_index(e, folders.files, folders.classes, tmp, f"store-{c}-{r}")
                stores[c] = tmp / f"store-{c}-{r}"
                results[c]["index"].append(rate)
                results[c]["foreign"].append(load)
                print(f"  [{label}] index run {r + 1}: {rate:6.2f} img/s   (foreign CPU load {load:4.0%}; "
                      f"{embedded} embedded in {seconds:.2f} s)")
                run_model(c, r + 2)

        vectors = [_store_vectors(stores[c]) for c in range(len(configs))]

    for res in results:
        model, index = statistics.mean(res["model"]), statistics.mean(res["index"])
        paired = [res["index"][r] / statistics.mean(res["model"][r:r + 2]) for r in range(args.rounds)]
        print(f"[{res['label']}] model forward (encode_pixels, mean of {len(res['model'])}): {model:6.2f} img/s; "
              f"end-to-end index_images (mean of {len(res['index'])}): {index:6.2f} img/s")
        print(f"[{res['label']}] ratio index / model: {index / model:.3f}  (per round: "
              f"{', '.join(f'{x:.3f}' for x in paired)}; target >= {TARGET_RATIO:.2f}: "
              f"{'met' if index / model >= TARGET_RATIO else 'NOT met'})")
        if max(res["foreign"]) > QUIET_LOAD:
            print(f"WARNING [{res['label']}]: other processes used up to {max(res['foreign']):.0%} of the CPU during "
                  f"timed runs (more than {QUIET_LOAD:.0%} counts as disturbed): re-run on a quiet machine.")
    if len(configs) == 2:
        base, variant = results
        speed = statistics.mean(variant["index"]) / statistics.mean(base["index"])
        model_speed = statistics.mean(variant["model"]) / statistics.mean(base["model"])
        per_round = [v / b for v, b in zip(variant["index"], base["index"])]
        A, B = vectors
        cos = float(np.mean(np.sum(A * B, axis=1)))
        print(f"{variant['label']} / {base['label']}: index {speed:.2f}x (per round: "
              f"{', '.join(f'{x:.2f}' for x in per_round)}), model only {model_speed:.2f}x; mean cosine to the "
              f"baseline's vectors {cos:.5f} (min {float(np.min(np.sum(A * B, axis=1))):.5f}); top-10 neighbour "
              f"overlap {top_k_overlap(A, B):.3f}")


def _store_vectors(db: Path) -> np.ndarray:
    """The vectors of a bench store, sorted by image id (the same images in every store)."""
    store = Store(db)
    es = store.load_embeddings(store.get_version().fingerprint)
    order = np.argsort(np.asarray(es.ids))
    return np.asarray(es.X)[order]


if __name__ == "__main__":
    main()
