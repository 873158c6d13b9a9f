"""Benchmark: latency of the review app (clipfuse serve) on a 300,000-image store.

The store holds 300,000 imported 512-d vectors (48 clustered classes, 15 labels each); every row
points at one of a few thousand real photo files (random crops of scikit-image's sample photos,
reached through one symlink per row). Heads are trained (probe, kNN) and predicted with per-head
probabilities, then the app is served by uvicorn on loopback and asked over HTTP with keep-alive:

- gallery: one page of 100 thumbnails (the HTML, then its 100 thumbnails over 6 connections like a
  browser, thumbnails already cached), across pages, filters and sorts;
- image page: one image's page (probabilities, 12 neighbours, label history);
- neighbours: ``/api/neighbors/<id>?k=12``.

Targets (the issue's): gallery p95 <= 300 ms, neighbours p95 <= 100 ms. The store is built once under
``bench/out/serve`` (``--rebuild`` to make it again).

    python bench/serve.py
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import classify_scale  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=300_000)
    p.add_argument("--files", type=int, default=3000, help="real image files the rows point at")
    p.add_argument("--requests", type=int, default=60, help="requests per measured endpoint")
    p.add_argument("--out", default=str(Path(__file__).parent / "out" / "serve"))
    p.add_argument("--rebuild", action="store_true")
    return p.parse_args(argv)


def write_photos(folder: Path, n: int, seed: int = 0) -> list[Path]:
    from PIL import Image
    from skimage import data

    from clipfuse.data.demo import random_crop

    photos = [data.chelsea(), data.coffee(), data.astronaut(), data.rocket(), data.camera(), data.immunohistochemistry()]
    photos = [Image.fromarray(p).convert("RGB") for p in photos]
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        path = folder / f"photo-{i:05d}.jpg"
        random_crop(photos[i % len(photos)], rng, width=320, scale=(0.4, 0.9)).save(path, quality=88)
        out.append(path)
    return out


def build(args) -> Path:
    import polars as pl

    import clipfuse

    out = Path(args.out)
    db = out / "store.lance"
    if db.exists() and not args.rebuild:
        return db
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    files = write_photos(out / "photos", args.files)
    X, y, _ = classify_scale.make_clustered(args.rows, 512, 48, 4, 2.4, 0)
    links = out / "rows"
    paths = []
    for i in range(args.rows):
        folder = links / f"{i // 1000:03d}"
        if i % 1000 == 0:
            folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"row-{i:06d}.jpg"
        os.symlink(files[i % len(files)], path)
        paths.append(str(path))
    rng = np.random.default_rng(0)
    labeled = np.concatenate([rng.choice(np.flatnonzero(y == c), 15, replace=False) for c in range(48)])
    label = np.full(args.rows, None, dtype=object)
    label[labeled] = [f"class-{c:02d}" for c in y[labeled]]
    np.save(out / "vectors.npy", X.astype(np.float32))
    pl.DataFrame({"id": [f"row{i:06d}" for i in range(args.rows)], "path": paths, "label": label.tolist()},
                 schema={"id": pl.Utf8, "path": pl.Utf8, "label": pl.Utf8}).write_parquet(out / "meta.parquet")
    ws = clipfuse.open(db)
    ws.import_embeddings(out / "vectors.npy", metadata=out / "meta.parquet")
    t1 = time.perf_counter()
    ws.train_heads(heads="probe,knn", folds=2)
    ws.predict(per_head=True)
    print(f"built the store: {args.rows} rows over {len(files)} files, import {t1 - t0:.0f} s, "
          f"train + predict {time.perf_counter() - t1:.0f} s", flush=True)
    return db


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentiles(times: list[float]) -> str:
    ms = sorted(1000 * t for t in times)
    p95 = ms[min(len(ms) - 1, int(round(0.95 * (len(ms) - 1))))]
    return f"p50 {statistics.median(ms):7.1f} ms   p95 {p95:7.1f} ms   (n={len(ms)})"


def main(argv=None) -> None:
    import httpx
    import uvicorn

    import clipfuse
    from clipfuse.webapp import create_app

    args = parse_args(argv)
    db = build(args)
    ws = clipfuse.open(db)
    port = _free_port()
    app = create_app(ws, port=port)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    base = f"http://127.0.0.1:{port}"
    client = httpx.Client(base_url=base, timeout=120)
    pool = [httpx.Client(base_url=base, timeout=120) for _ in range(6)]
    executor = concurrent.futures.ThreadPoolExecutor(6)
    rng = np.random.default_rng(1)

    t = time.perf_counter()
    client.get("/gallery").raise_for_status()  # the first request builds the joined table
    print(f"first gallery request (builds the cached table of {args.rows} rows): {time.perf_counter() - t:.2f} s")
    total = client.get("/api/gallery?limit=1").json()["total"]
    pages = [f"/gallery?page={int(p)}" for p in rng.integers(1, total // 100, args.requests // 2)]
    filters = ["/gallery?split=unlabeled&sort=margin", "/gallery?predicted=class-07", "/gallery?min_confidence=0.2"
               "&max_confidence=0.6", "/gallery?disagree=1", "/gallery?sort=-confidence&page=40",
               "/gallery?label=class-03", "/gallery?predicted=class-30&sort=path"]
    urls = pages + [filters[i % len(filters)] for i in range(args.requests - len(pages))]

    def thumbs_of(html: str) -> list[str]:
        return [part.split('"')[0] for part in html.split('src="')[1:] if part.startswith("/thumb/")]

    def fetch_all(paths: list[str]) -> None:
        chunks = [paths[i::6] for i in range(6)]
        list(executor.map(lambda pair: [pair[0].get(p).raise_for_status() for p in pair[1]], zip(pool, chunks)))

    t = time.perf_counter()
    for url in urls:  # warm the thumbnail cache of every measured page
        fetch_all(thumbs_of(client.get(url).text))
    print(f"made the thumbnails of {len(urls)} pages: {time.perf_counter() - t:.1f} s")

    page_only, page_and_thumbs = [], []
    for url in urls:
        t = time.perf_counter()
        html = client.get(url).text
        page_only.append(time.perf_counter() - t)
        fetch_all(thumbs_of(html))
        page_and_thumbs.append(time.perf_counter() - t)
    ids = [r["id"] for r in client.get(f"/api/gallery?limit=500&offset={int(rng.integers(0, total - 500))}").json()["rows"]]
    ids = [ids[int(i)] for i in rng.integers(0, len(ids), args.requests)]
    t = time.perf_counter()
    client.get(f"/api/neighbors/{ids[0]}", timeout=1800).raise_for_status()  # loads (or builds) the hnswlib graph
    print(f"first neighbours request (loads or builds the neighbour graph): {time.perf_counter() - t:.1f} s")
    image_page, neighbours = [], []
    for id_ in ids:
        t = time.perf_counter()
        client.get(f"/image/{id_}").raise_for_status()
        image_page.append(time.perf_counter() - t)
        t = time.perf_counter()
        client.get(f"/api/neighbors/{id_}?k=12").raise_for_status()
        neighbours.append(time.perf_counter() - t)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    print(f"\n{args.rows} rows, {os.cpu_count()} CPUs ({cpu}), warm caches, keep-alive HTTP on loopback")
    print(f"gallery page (HTML only)          {percentiles(page_only)}")
    print(f"gallery page + 100 thumbnails     {percentiles(page_and_thumbs)}   target p95 <= 300 ms")
    print(f"image page                        {percentiles(image_page)}")
    print(f"neighbours /api/neighbors (k=12)  {percentiles(neighbours)}   target p95 <= 100 ms")
    server.should_exit = True
    thread.join(10)


if __name__ == "__main__":
    main()
