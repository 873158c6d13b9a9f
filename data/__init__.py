"""Find images and labels: folder layouts, the seeded 80/20 split, the demo sample; safe file reads and writes."""

from .classwords import default_class_words, load_class_words, readable_name
from .demo import write_digits_dataset
from .files import (
    DEFAULT_MAX_FILE_BYTES,
    AtomicFolder,
    FileTooLargeError,
    atomic_write,
    is_printable,
    is_stream,
    leftover_folders,
    neutralise_cell,
    printable_path,
    publish_folder,
    read_regular_file,
    replace_folder,
    resolve_published,
    write_csv,
    write_frame_csv,
    write_text_atomic,
    write_with,
)
from .folders import (
    IMAGE_EXTENSIONS,
    SPLIT_PRIORITY,
    SPLITS,
    UNSUPPORTED_EXTENSIONS,
    ImageFile,
    ImageFolders,
    hash_bytes,
    is_image_name,
    list_images,
    scan_folders,
    scan_labeled,
    walk_images,
)
from .split import split_labeled

__all__ = [
    "AtomicFolder", "DEFAULT_MAX_FILE_BYTES", "FileTooLargeError", "IMAGE_EXTENSIONS", "SPLITS", "SPLIT_PRIORITY",
    "UNSUPPORTED_EXTENSIONS", "ImageFile", "ImageFolders", "atomic_write", "default_class_words", "hash_bytes",
    "is_image_name", "is_printable", "is_stream", "leftover_folders", "list_images", "load_class_words", "neutralise_cell",
    "printable_path", "publish_folder", "read_regular_file", "readable_name", "replace_folder", "resolve_published",
    "scan_folders", "scan_labeled", "split_labeled", "walk_images", "write_csv", "write_digits_dataset", "write_frame_csv",
    "write_text_atomic", "write_with",
]
