"""Decode and resize images in worker processes while the model runs: reader -> mapper -> batches."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset

from clipfuse.data import DEFAULT_MAX_FILE_BYTES

from .images import DEFAULT_MAX_PIXELS, ImageRecord, read_image


@dataclass
class ImageBatch:
    """A batch of read files: every record, and pixels for the readable ones.

    ``pixels[j]`` belongs to ``records[ok[j]]``; records with ``error`` set have no pixels.
    """

    records: list[ImageRecord]
    ok: list[int]  # indices into records of the decoded images, in pixel order
    pixels: torch.Tensor  # (len(ok), 3, H, W)


class ImageFileDataset(Dataset):
    """Reads, hashes, decodes and preprocesses one file per item; never raises for a bad file."""

    def __init__(self, paths: list[str], preprocess: Callable, *, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                 max_bytes: int | None = DEFAULT_MAX_FILE_BYTES, storage_options: dict | None = None,
                 draft_size: int | None = None):
        self.paths = paths
        self.draft_size = draft_size
        self.preprocess = preprocess
        self.max_pixels = max_pixels
        self.max_bytes = max_bytes
        self.storage_options = storage_options

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[ImageRecord, torch.Tensor | None]:
        record, img = read_image(self.paths[i], max_pixels=self.max_pixels, max_bytes=self.max_bytes,
                                 storage_options=self.storage_options, draft_size=self.draft_size)
        return record, preprocess_image(record, img, self.preprocess)


def preprocess_image(record: ImageRecord, img, preprocess: Callable) -> torch.Tensor | None:
    """The model's preprocessing of a decoded image; None (with ``record.error`` set) when it fails."""
    if img is None:
        return None
    try:
        return preprocess(img)
    except Exception as e:  # a transform that chokes on a degenerate image (e.g. 1x0 after EXIF)
        record.error = f"preprocessing failed: {type(e).__name__}: {e}"
        return None


def collate_images(items: list[tuple[ImageRecord, torch.Tensor | None]]) -> ImageBatch:
    records = [r for r, _ in items]
    ok = [i for i, (_, px) in enumerate(items) if px is not None]
    pixels = torch.stack([items[i][1] for i in ok]) if ok else torch.zeros(0, 3, 1, 1)
    return ImageBatch(records=records, ok=ok, pixels=pixels)


def iter_image_batches(
    paths: list[str],
    preprocess: Callable,
    *,
    batch_size: int = 32,
    workers: int = 1,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    max_bytes: int | None = DEFAULT_MAX_FILE_BYTES,
    pin_memory: bool = False,
    storage_options: dict | None = None,
    draft_size: int | None = None,
    threads: int = 1,
) -> Iterator[ImageBatch]:
    """Yield :class:`ImageBatch` es in the order of ``paths``.

    With ``workers > 0`` files are read and preprocessed in that many worker
    processes, a few batches ahead of the consumer, so decoding overlaps the model
    (right when the model runs elsewhere: a GPU). With ``workers == 0`` each batch is read
    when the consumer asks for it, by ``threads`` threads (Pillow and torch release the GIL):
    on a CPU that runs the model on every core, decoding then takes turns with the model
    instead of taking a core from it mid-forward.
    ``draft_size``: JPEGs decode at reduced size (see :func:`clipfuse.embed.decode_image`).
    """
    dataset = ImageFileDataset(paths, preprocess, max_pixels=max_pixels, max_bytes=max_bytes,
                               storage_options=storage_options, draft_size=draft_size)
    if workers == 0:
        yield from _batches_in_threads(dataset, batch_size, threads)
        return
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=collate_images,
        pin_memory=pin_memory,
        prefetch_factor=4 if workers > 0 else None,
        persistent_workers=False,
    )
    # Workers are forked once, here, before the caller starts any write of this run, so no
    # LanceDB operation is in flight at fork time (the case LanceDB's fork warning is about).
    # fork, unlike spawn/forkserver, needs no `if __name__ == "__main__"` guard in user scripts.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="lancedb fork support", category=RuntimeWarning)
        batches = iter(loader)
    yield from batches


def _batches_in_threads(dataset: ImageFileDataset, batch_size: int, threads: int) -> Iterator[ImageBatch]:
    """Each batch read and preprocessed when asked for, its files shared out over ``threads`` threads."""
    import contextlib
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(threads, thread_name_prefix="clipfuse-decode") if threads > 1 \
            else contextlib.nullcontext() as pool:
        read = map if pool is None else pool.map
        for start in range(0, len(dataset), batch_size):
            yield collate_images(list(read(dataset.__getitem__, range(start, min(start + batch_size, len(dataset))))))
