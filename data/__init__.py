"""Find images and labels: folder layouts, the seeded 80/20 split, the demo sample."""

from .demo import write_digits_dataset
from .folders import IMAGE_EXTENSIONS, hash_bytes, SPLITS, ImageFile, ImageFolders, list_images, scan_folders, scan_labeled
from .split import split_labeled

__all__ = [
    "IMAGE_EXTENSIONS", "SPLITS", "hash_bytes", "ImageFile", "ImageFolders", "list_images", "scan_folders",
    "scan_labeled", "split_labeled", "write_digits_dataset",
]
