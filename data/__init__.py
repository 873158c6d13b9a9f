"""Find images and labels: folder layouts, the seeded 80/20 split, the demo sample."""

from .classwords import default_class_words, load_class_words, readable_name
from .demo import write_digits_dataset
from .folders import (
    IMAGE_EXTENSIONS,
    SPLIT_PRIORITY,
    SPLITS,
    ImageFile,
    ImageFolders,
    hash_bytes,
    list_images,
    scan_folders,
    scan_labeled,
)
from .split import split_labeled

__all__ = [
    "IMAGE_EXTENSIONS", "SPLITS", "default_class_words", "load_class_words", "readable_name", "SPLIT_PRIORITY", "hash_bytes", "ImageFile", "ImageFolders", "list_images",
    "scan_folders",
    "scan_labeled", "split_labeled", "write_digits_dataset",
]
