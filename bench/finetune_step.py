"""Benchmark: finetuning throughput against the model's pure forward+backward, side by side.

Builds ViT-B-32 with random weights (speed does not depend on them), writes ``--n``
generated 640x480 JPEGs, and measures in one run:

* ``pure``: ``encode_image`` forward + backward of a preprocessed batch, nothing else;
* ``finetune``: :func:`clipfuse.train.finetune` over the same images (image reading and
  preprocessing, cosine classifier, AdamW, schedule, gradient clipping), per epoch.

Prints images/s of each and their ratio (target: the loop loses little around the model).

    python bench/finetune_step.py                 # ~6 min on 2 cores
    python bench/finetune_step.py --augment --n 64
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="ViT-B-32")
    p.add_argument("--n", type=int, default=64, help="training images")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--augment", action="store_true")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = all cores)")
    return p.parse_args(argv)


def write_images(folder: Path, n: int) -> list[str]:
    from PIL import Image

    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        pixels = rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)
        path = folder / f"{i:04d}.jpg"
        Image.fromarray(pixels).save(path, quality=90)
        paths.append(str(path))
    return paths


def main(argv=None):
    args = parse_args(argv)
    logging.getLogger().setLevel(logging.ERROR)  # open_clip logs the random weights we asked for
    if args.threads:
        torch.set_num_threads(args.threads)
    from clipfuse.embed import EmbedderConfig, create_embedder
    from clipfuse.train import FinetuneConfig, finetune

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        embedder = create_embedder(EmbedderConfig(model=args.model, random_weights=True,
                                                  batch_size=args.batch_size))
    n_classes = 4
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_images(Path(tmp), args.n)
        train = [(p, i % n_classes) for i, p in enumerate(paths)]
        text = np.random.default_rng(0).standard_normal((n_classes, embedder.dim)).astype(np.float32) \
            if embedder.has_text else None  # image-only backbones start from a linear probe instead

        # pure forward + backward on one preprocessed batch, after a warm-up step
        model = embedder.model
        model.train()
        from PIL import Image

        x = embedder.preprocess(Image.open(paths[0])).unsqueeze(0).repeat(args.batch_size, 1, 1, 1)
        for p in model.parameters():
            p.requires_grad_(True)
        model.encode_image(x[:2]).sum().backward()
        steps = max(1, args.n * args.epochs // args.batch_size)
        start = time.perf_counter()
        for _ in range(steps):
            model.zero_grad(set_to_none=True)
            model.encode_image(x).float().sum().backward()
        pure = steps * args.batch_size / (time.perf_counter() - start)

        config = FinetuneConfig(epochs=args.epochs, batch_size=args.batch_size, augment=args.augment,
                                patience=args.epochs, lr=1e-5)
        start = time.perf_counter()
        result = finetune(embedder, train, [], text, config)
        total = time.perf_counter() - start
        per_epoch = [h["seconds"] for h in result.history]
        ft = args.n / np.mean(per_epoch)

    print(f"{args.model}, batch {args.batch_size}, {args.n} images, {torch.get_num_threads()} torch threads, "
          f"augment={args.augment}")
    print(f"pure forward+backward : {pure:6.2f} img/s")
    print(f"finetune epoch        : {ft:6.2f} img/s   (epochs {', '.join(f'{s:.1f}' for s in per_epoch)} s; "
          f"{total:.1f} s in all with image loading)")
    print(f"ratio finetune / pure : {ft / pure:.3f}")


if __name__ == "__main__":
    main()
