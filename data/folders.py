"""Find images and their labels in folder layouts: the first step of the flow."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

from .files import is_printable, printable_path
from .remote import is_uri, list_files

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jfif", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm",
     ".avif", ".heic", ".heif"}  # AVIF: Pillow itself; HEIC/HEIF: pillow-heif
)
# Image files that are listed (so they are reported) but can't be read: the reason says what to do.
UNSUPPORTED_EXTENSIONS = {
    **dict.fromkeys((".cr2", ".cr3", ".nef", ".arw", ".dng", ".raf", ".orf", ".rw2", ".srw", ".pef"),
                    "camera RAW files are not read; export them as JPEG, PNG or TIFF"),
    ".jxl": "JPEG XL is not read; convert it to JPEG, PNG or AVIF",
    ".svg": "vector drawings (SVG) are not read; render them to PNG",
}
SPLITS = ("labeled", "unlabeled", "test")
SPLIT_PRIORITY = {"labeled": 0, "test": 1, "unlabeled": 2}  # one file or id in several splits takes the first


@dataclass(frozen=True)
class ImageFile:
    """One image file found on disk, with the split and label its location gives it."""

    path: str  # absolute path, or the object's URI (s3://...) for folders on object storage
    split: str  # one of SPLITS
    label: str | None  # class name, None when the location carries no label
    size: int | None = None  # listed size and mtime of an object on object storage (local files: None, stat'ed)
    mtime: float | None = None


@dataclass(frozen=True)
class ImageFolders:
    """Every image found under the user's folders, and the ordered class list."""

    files: list[ImageFile]
    classes: list[str]
    roots: list[str] = field(default_factory=list)  # absolute folders that were scanned
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason) of folders not entered


def hash_bytes(data: bytes) -> str:
    """Content id of a file: 128-bit BLAKE2b of its bytes, as 32 hex digits."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def is_image_name(name: str) -> bool:
    """Whether a file name has an image extension, readable or reported (case-insensitive)."""
    ext = os.path.splitext(name)[1].lower()
    return ext in IMAGE_EXTENSIONS or ext in UNSUPPORTED_EXTENSIONS


def walk_images(root: str | os.PathLike) -> tuple[list[str], list[tuple[str, str]]]:
    """Image files under ``root`` recursively, and the folders that were not entered.

    Hidden files and folders are skipped. Symbolic links to folders are not followed
    (a link such as ``cat/loop -> ..`` would list images twice, under another label);
    they are returned in ``skipped`` with the reason. Links to files are kept.

    Returns
    -------
    paths : list of str
        Sorted absolute paths of files with an image extension (``IMAGE_EXTENSIONS``,
        and ``UNSUPPORTED_EXTENSIONS`` so that those are reported rather than ignored).
    skipped : list of (path, reason)
    """
    root = Path(root).absolute()
    found, skipped = [], []
    for dirpath, dirnames, filenames in os.walk(root):
        kept = []
        for d in sorted(dirnames):
            if d.startswith("."):
                continue
            if os.path.islink(os.path.join(dirpath, d)):
                skipped.append((printable_path(os.path.join(dirpath, d)), "symbolic link to a folder: not followed"))
            else:
                kept.append(d)
        dirnames[:] = kept
        found += [os.path.join(dirpath, name) for name in filenames if not name.startswith(".") and is_image_name(name)]
    return sorted(found), skipped


def list_images(root: str | os.PathLike) -> list[str]:
    """Image files under ``root`` recursively, sorted (see :func:`walk_images`)."""
    return walk_images(root)[0]


def _class_dirs(root: Path, skipped: list | None = None, *, check_names: bool = True) -> list[Path]:
    """Class sub-folders: real folders only (a symlinked one is reported in ``skipped``)."""
    dirs = []
    for p in sorted(root.iterdir()):
        if p.name.startswith(".") or not p.is_dir():
            continue
        if p.is_symlink():
            if skipped is not None:
                skipped.append((printable_path(p), "symbolic link to a folder: not followed"))
            continue
        if check_names and not is_printable(p.name):
            raise ValueError(f"class folder {printable_path(p)!r} has a name that is not valid UTF-8, so it can't "
                             "be a class name; rename the folder.")
        dirs.append(p)
    return dirs


def _top_level_images(root: Path) -> list[Path]:
    return sorted(
        p for p in root.iterdir()
        if p.is_file() and not p.name.startswith(".") and is_image_name(p.name)
    )


def _require_dir(path: str | os.PathLike, what: str) -> Path:
    path = Path(path).absolute()
    if not is_printable(path):
        raise ValueError(f"{what} folder {printable_path(path)!r} has a name that is not valid UTF-8; the store keeps "
                         "paths as text, so rename the folder.")
    if not path.exists():
        raise FileNotFoundError(f"{what} folder {str(path)!r} does not exist; check the path.")
    if not path.is_dir():
        raise NotADirectoryError(f"{what} {str(path)!r} is a file, not a folder; pass the folder that holds the images.")
    return path


def scan_labeled(root: str | os.PathLike, skipped: list | None = None) -> tuple[list[ImageFile], list[str]]:
    """Read a labeled folder laid out as ``root/<class name>/<images...>``.

    ``skipped``, when given, receives ``(path, reason)`` for the folders not entered
    (symbolic links to folders).

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
    skipped = [] if skipped is None else skipped
    for class_dir in _class_dirs(root, skipped):
        paths, inner = walk_images(class_dir)
        skipped += inner
        if paths:
            classes.append(class_dir.name)
            files.extend(ImageFile(p, "labeled", class_dir.name) for p in paths)
    if not files:
        raise ValueError(
            f"labeled folder {str(root)!r} holds no images in class sub-folders "
            f"(looked for {', '.join(sorted(IMAGE_EXTENSIONS))}); expected LABELED_DIR/<class>/<image>."
        )
    return files, classes


def _one_per_path(files: list[ImageFile]) -> list[ImageFile]:
    """One entry per path, sorted. A file reached through two of the folders (e.g. --unlabeled pointing at a
    parent of the labeled folder) keeps the most informative entry: labeled, then test, then unlabeled."""
    unique: dict[str, ImageFile] = {}
    for f in files:
        if f.path not in unique or SPLIT_PRIORITY[f.split] < SPLIT_PRIORITY[unique[f.path].split]:
            unique[f.path] = f
    return sorted(unique.values(), key=lambda f: f.path)


def scan_folders(
    labeled: str | os.PathLike | None = None,
    *,
    unlabeled: str | os.PathLike | None = None,
    test: str | os.PathLike | None = None,
    known_classes: list[str] | None = None,
    storage_options: dict | None = None,
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
    storage_options : dict, optional
        For folders on object storage (``s3://bucket/train``): credentials and endpoint
        (LanceDB's keys), over the cloud's standard variables. All folders of one run are
        then on object storage.

    Returns
    -------
    ImageFolders
    """
    if labeled is None and unlabeled is None and test is None:
        raise ValueError("no folder given: pass a labeled folder and/or --unlabeled / --test folders.")
    if any(is_uri(str(f)) for f in (labeled, unlabeled, test) if f is not None):
        return _scan_remote(labeled, unlabeled, test, known_classes, storage_options)
    classes = list(known_classes or [])
    files: list[ImageFile] = []
    skipped: list[tuple[str, str]] = []
    if labeled is not None:
        labeled_files, labeled_classes = scan_labeled(labeled, skipped)
        classes += [c for c in labeled_classes if c not in classes]
        files += labeled_files
    if unlabeled is not None:
        paths, inner = walk_images(_require_dir(unlabeled, "unlabeled"))
        skipped += inner
        files += [ImageFile(p, "unlabeled", None) for p in paths]
    if test is not None:
        root = _require_dir(test, "test")
        if not _top_level_images(root) and any(list_images(d) for d in _class_dirs(root, check_names=False)):
            class_dirs = [d for d in _class_dirs(root, skipped) if list_images(d)]
            unknown = [d.name for d in class_dirs if d.name not in classes]
            if unknown:
                raise ValueError(
                    f"test folder {str(root)!r} has class folders {unknown} that are not among the labeled "
                    f"classes {classes}; rename them to match, or index a labeled folder that has them."
                )
            for d in class_dirs:
                paths, inner = walk_images(d)
                skipped += inner
                files += [ImageFile(p, "test", d.name) for p in paths]
        else:
            paths, inner = walk_images(root)
            skipped += inner
            files += [ImageFile(p, "test", None) for p in paths]
    if not files:
        raise ValueError("the given folders hold no image files; check the paths and extensions.")
    roots = [str(Path(r).absolute()) for r in (labeled, unlabeled, test) if r is not None]
    return ImageFolders(files=_one_per_path(files), classes=classes, roots=roots,
                        skipped=sorted(set(skipped)))


def _scan_remote(labeled, unlabeled, test, known_classes, storage_options) -> ImageFolders:
    """:func:`scan_folders` for folders on object storage: the same layout rules, over object listings.

    Objects (or folders) whose name starts with a dot are skipped, as on disk; object storage has
    no links to follow.
    """
    given = [(name, str(f)) for name, f in (("labeled", labeled), ("unlabeled", unlabeled), ("test", test))
             if f is not None]
    local = [f"{name} folder {f!r}" for name, f in given if not is_uri(f)]
    if local:
        raise ValueError(f"{', '.join(local)} is on this machine while another folder is on object storage; give all "
                         "folders of one run on object storage (upload it), or all local.")

    def listing(name: str, root: str) -> list[tuple[str, list[str], object]]:
        """(uri, parts below root, RemoteFile) of every visible image object under ``root``."""
        root = root.rstrip("/")
        found = []
        for obj in list_files(root, storage_options):
            parts = obj.uri[len(root) + 1:].split("/")
            if any(p.startswith(".") or not p for p in parts) or not is_image_name(parts[-1]):
                continue
            found.append((obj.uri, parts, obj))
        return found

    def image(obj, split, label) -> ImageFile:
        return ImageFile(obj.uri, split, label, size=obj.size, mtime=obj.mtime)

    classes = list(known_classes or [])
    files: list[ImageFile] = []
    if labeled is not None:
        root = str(labeled).rstrip("/")
        found = listing("labeled", root)
        loose = [parts[0] for _, parts, _ in found if len(parts) == 1]
        if loose:
            raise ValueError(
                f"labeled folder {root!r} has {len(loose)} image(s) directly inside it ({', '.join(loose[:3])}); "
                "labeled images must sit in one sub-folder per class, e.g. LABELED_DIR/cat/001.jpg. Move them "
                "into class folders, or pass the folder with --unlabeled instead.")
        if not found:
            raise ValueError(f"labeled folder {root!r} holds no images in class sub-folders (looked for "
                             f"{', '.join(sorted(IMAGE_EXTENSIONS))}); expected LABELED_DIR/<class>/<image>.")
        labeled_classes = sorted({parts[0] for _, parts, _ in found})
        classes += [c for c in labeled_classes if c not in classes]
        files += [image(obj, "labeled", parts[0]) for _, parts, obj in found]
    if unlabeled is not None:
        files += [image(obj, "unlabeled", None) for _, _, obj in listing("unlabeled", str(unlabeled))]
    if test is not None:
        root = str(test).rstrip("/")
        found = listing("test", root)
        if found and all(len(parts) > 1 for _, parts, _ in found):
            unknown = sorted({parts[0] for _, parts, _ in found} - set(classes))
            if unknown:
                raise ValueError(f"test folder {root!r} has class folders {unknown} that are not among the labeled "
                                 f"classes {classes}; rename them to match, or index a labeled folder that has them.")
            files += [image(obj, "test", parts[0]) for _, parts, obj in found]
        else:
            files += [image(obj, "test", None) for _, _, obj in found]
    if not files:
        raise ValueError("the given folders hold no image files; check the URIs and extensions.")
    return ImageFolders(files=_one_per_path(files), classes=classes,
                        roots=[f.rstrip("/") for _, f in given])
