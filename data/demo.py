"""The demo sample: scikit-learn's digits written out as a PNG image dataset."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .files import write_csv, write_with

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def write_digits_dataset(
    root: str | os.PathLike, *, n_labeled_per_class: int = 15, max_unlabeled: int | None = None, seed: int = 0
) -> dict[str, Path]:
    """Write sklearn's 1,797 handwritten digits as 8x8 grayscale PNGs.

    ``n_labeled_per_class`` images per class go to ``root/labeled/<class>/``; the rest go
    to ``root/unlabeled/`` (a seeded random ``max_unlabeled`` of them when given, for a
    quicker run), and their true labels to ``root/unlabeled_labels.csv`` so that
    predictions can be scored. Files already in place are left untouched (so a re-run
    re-indexes nothing); digit files that a different seed or count put elsewhere are removed.

    Returns
    -------
    dict
        ``{"labeled": Path, "unlabeled": Path, "truth": Path}``.
    """
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = np.clip(np.round(digits.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    rng = np.random.default_rng(seed)
    labeled_idx = set()
    for c in range(10):
        idx = np.flatnonzero(digits.target == c)
        labeled_idx.update(rng.choice(idx, size=min(n_labeled_per_class, len(idx)), replace=False).tolist())
    unlabeled_idx = np.setdiff1d(np.arange(len(pixels)), sorted(labeled_idx))
    if max_unlabeled is not None and max_unlabeled < len(unlabeled_idx):
        unlabeled_idx = rng.choice(unlabeled_idx, size=max_unlabeled, replace=False)
    keep = labeled_idx | set(unlabeled_idx.tolist())

    root = Path(root).absolute()
    labeled_dir, unlabeled_dir = root / "labeled", root / "unlabeled"
    truth_rows, planned = [], set()
    for i, (img, target) in enumerate(zip(pixels, digits.target)):
        if i not in keep:
            continue
        name = DIGIT_NAMES[target]
        if i in labeled_idx:
            path = labeled_dir / name / f"digit_{i:04d}.png"
        else:
            path = unlabeled_dir / f"digit_{i:04d}.png"
            truth_rows.append((str(path), name))
        planned.add(path)
        if not path.exists():  # written whole or not at all: a killed run never leaves half a PNG to skip
            write_with(path, lambda tmp, img=img: Image.fromarray(img).save(tmp, format="PNG"))
    for stale in set(labeled_dir.glob("*/digit_*.png")) | set(unlabeled_dir.glob("digit_*.png")):
        if stale not in planned:
            stale.unlink()
    truth = write_csv(root / "unlabeled_labels.csv", ["path", "label"], truth_rows)
    return {"labeled": labeled_dir, "unlabeled": unlabeled_dir, "truth": truth}


def random_crop(img, rng: np.random.Generator, *, width: int, scale=(0.55, 0.9)):
    """A random crop of a PIL image (``scale`` of each side), resized to ``width`` pixels wide and mirrored
    half the time: many distinct but alike images from one photo (the review app's test and benchmark)."""
    from PIL import ImageOps

    w, h = img.size
    s = rng.uniform(*scale)
    cw, ch = int(w * s), int(h * s)
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    crop = img.crop((x, y, x + cw, y + ch)).resize((width, int(width * ch / cw)))
    return ImageOps.mirror(crop) if rng.random() < 0.5 else crop
