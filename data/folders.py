"""Find images and their labels in folder layouts: the first step of the flow."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
)
SPLITS = ("labeled", "unlabeled", "test")
SPLIT_PRIORITY = {"labeled": 0, "test": 1, "unlabeled": 2}  # one file or id in several splits takes the first


@dataclass(frozen=True)
class ImageFile:
    """One image file found on disk, with the split and label its location gives it."""

    path: str  # absolute path
    split: str  # one of SPLITS
    label: str | None  # class name, None when the location carries no label


@dataclass(frozen=True)
class ImageFolders:
    """Every image found under the user's folders, and the ordered class list."""

    files: list[ImageFile]
    classes: list[str]
    roots: list[str] = field(default_factory=list)  # absolute folders that were scanned


def hash_bytes(data: bytes) -> str:
    """Content id of a file: 128-bit BLAKE2b of its bytes, as 32 hex digits."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def list_images(root: str | os.PathLike) -> list[str]:
    """List image files under ``root`` recursively, sorted, skipping hidden files.

    Parameters
    ----------
    root : path-like
        Folder to walk. Symbolic links to folders are not followed.

    Returns
    -------
    paths : list of str
        Absolute paths of files whose extension is in ``IMAGE_EXTENSIONS``
        (case-insensitive).
    """
    root = Path(root).absolute()
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if name.startswith("."):
                continue
            if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                found.append(os.path.join(dirpath, name))
    return sorted(found)


def _class_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _top_level_images(root: Path) -> list[Path]:
    return sorted(
        p for p in root.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS
    )


def _require_dir(path: str | os.PathLike, what: str) -> Path:
    path = Path(path).absolute()
    if not path.exists():
        raise FileNotFoundError(f"{what} folder {str(path)!r} does not exist; check the path.")
    if not path.is_dir():
        raise NotADirectoryError(f"{what} {str(path)!r} is a file, not a folder; pass the folder that holds the images.")
    return path


def scan_labeled(root: str | os.PathLike) -> tuple[list[ImageFile], list[str]]:
    """Read a labeled folder laid out as ``root/<class name>/<images...>``.

    Returns
    -------
    files : list of ImageFile
        One entry per image, labeled with its class sub-folder's name.
    classes : list of str
        Sorted class names (sub-folders that hold at least one image).
    """
    root = _require_dir(root, "labeled")
    loose = _top_level_images(root)
    if loose:
        examples = ", ".join(p.name for p in loose[:3])
        raise ValueError(
            f"labeled folder {str(root)!r} has {len(loose)} image(s) directly inside it ({examples}); "
            "labeled images must sit in one sub-folder per class, e.g. LABELED_DIR/cat/001.jpg. "
            "Move them into class folders, or pass the folder with --unlabeled instead."
        )
    files, classes = [], []
    for class_dir in _class_dirs(root):
        paths = list_images(class_dir)
        if paths:
            classes.append(class_dir.name)
            files.extend(ImageFile(p, "labeled", class_dir.name) for p in paths)
    if not files:
        raise ValueError(
            f"labeled folder {str(root)!r} holds no images in class sub-folders "
            f"(looked for {', '.join(sorted(IMAGE_EXTENSIONS))}); expected LABELED_DIR/<class>/<image>."
        )
    return files, classes


def scan_folders(
    labeled: str | os.PathLike | None = None,
    *,
    unlabeled: str | os.PathLike | None = None,
    test: str | os.PathLike | None = None,
    known_classes: list[str] | None = None,
) -> ImageFolders:
    """Find every image of a run and assign it a split and a label.

    Parameters
    ----------
    labeled : path-like, optional
        Folder with one sub-folder per class.
    unlabeled : path-like, optional
        Folder of unlabeled images, searched recursively.
    test : path-like, optional
        Test images: either one sub-folder per class (labels known) or a plain folder.
    known_classes : list of str, optional
        Classes already in the store; new labeled classes are appended after them so
        that class indices stay stable across runs.

    Returns
    -------
    ImageFolders
    """
    if labeled is None and unlabeled is None and test is None:
        raise ValueError("no folder given: pass a labeled folder and/or --unlabeled / --test folders.")
    classes = list(known_classes or [])
    files: list[ImageFile] = []
    if labeled is not None:
        labeled_files, labeled_classes = scan_labeled(labeled)
        classes += [c for c in labeled_classes if c not in classes]
        files += labeled_files
    if unlabeled is not None:
        root = _require_dir(unlabeled, "unlabeled")
        files += [ImageFile(p, "unlabeled", None) for p in list_images(root)]
    if test is not None:
        root = _require_dir(test, "test")
        class_dirs = [d for d in _class_dirs(root) if list_images(d)]
        if class_dirs and not _top_level_images(root):
            unknown = [d.name for d in class_dirs if d.name not in classes]
            if unknown:
                raise ValueError(
                    f"test folder {str(root)!r} has class folders {unknown} that are not among the labeled "
                    f"classes {classes}; rename them to match, or index a labeled folder that has them."
                )
            for d in class_dirs:
                files += [ImageFile(p, "test", d.name) for p in list_images(d)]
        else:
            files += [ImageFile(p, "test", None) for p in list_images(root)]
    if not files:
        raise ValueError("the given folders hold no image files; check the paths and extensions.")
    # A file reached through two of the folders (e.g. --unlabeled pointing at a parent of the
    # labeled folder) keeps one entry, the most informative: labeled, then test, then unlabeled.
    unique: dict[str, ImageFile] = {}
    for f in files:
        if f.path not in unique or SPLIT_PRIORITY[f.split] < SPLIT_PRIORITY[unique[f.path].split]:
            unique[f.path] = f
    roots = [str(Path(r).absolute()) for r in (labeled, unlabeled, test) if r is not None]
    return ImageFolders(files=sorted(unique.values(), key=lambda f: f.path), classes=classes, roots=roots)
