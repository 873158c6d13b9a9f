"""Files on disk, safely: read only regular files under a size cap, write atomically, show any name."""

from __future__ import annotations

import contextlib
import csv
import glob
import io
import os
import re
import shutil
import stat
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Iterable

DEFAULT_MAX_FILE_BYTES = 512 * 1024 * 1024  # larger than any real photo; a runaway file stops here
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")  # what a spreadsheet may run as a formula (OWASP)


class FileTooLargeError(ValueError):
    """A file is larger than the size cap it was read under."""


def printable_path(path: str | os.PathLike) -> str:
    """``path`` as a string that can be stored, printed and written as UTF-8.

    A name that is not valid UTF-8 (Python keeps its bytes as surrogates) has those
    bytes shown as ``\\xNN``, so it can be recorded and reported.
    """
    path = os.fspath(path)
    try:
        path.encode("utf-8")
        return path
    except UnicodeEncodeError:
        return os.fsencode(path).decode("utf-8", "backslashreplace")


def is_printable(path: str | os.PathLike) -> bool:
    """Whether ``path`` is valid UTF-8 (and so round-trips through the store)."""
    return printable_path(path) == os.fspath(path)


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def read_regular_file(path: str | os.PathLike, *, max_bytes: int | None = DEFAULT_MAX_FILE_BYTES) -> tuple[bytes, os.stat_result]:
    """Read a whole regular file (following symlinks), refusing anything else.

    The file is opened without blocking and checked on the open descriptor, so a FIFO
    never hangs the reader and a symlink swapped for a device between a check and the
    read is still refused.

    Parameters
    ----------
    path : path-like
    max_bytes : int or None
        Largest size read; None for no cap.

    Returns
    -------
    data : bytes
    st : os.stat_result of the opened file

    Raises
    ------
    OSError
        The file can't be opened, or it is a FIFO, device, socket or folder (the message
        says which).
    FileTooLargeError
        It is larger than ``max_bytes`` (or grew past it while being read).
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(f"{_kind(st.st_mode)}, not a regular file: only regular files are read")
        if max_bytes is not None and st.st_size > max_bytes:
            raise FileTooLargeError(_too_large(st.st_size, max_bytes))
        os.set_blocking(fd, True)
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read() if max_bytes is None else f.read(max_bytes + 1)
        if max_bytes is not None and len(data) > max_bytes:
            raise FileTooLargeError(_too_large(len(data), max_bytes))
        return data, st
    finally:
        os.close(fd)


def _too_large(size: int, cap: int) -> str:
    return (f"file of {size / 2**20:,.1f} MiB is larger than the {cap / 2**20:,.0f} MiB limit "
            "(raise it with --max-file-size MiB)")


# ---- atomic writes -----------------------------------------------------------------------
_UMASK_LOCK = threading.Lock()


def _umask() -> int:
    with _UMASK_LOCK:  # the only way to read the umask is to set it
        umask = os.umask(0o022)
        os.umask(umask)
    return umask


_FD_PATH = re.compile(r"^/(?:dev/fd|proc/self/fd)/(\d+)$")
_STD_PATHS = {"/dev/stdin": 0, "/dev/stdout": 1, "/dev/stderr": 2}


def _descriptor_of(path: str | os.PathLike) -> int | None:
    """The open descriptor that ``/dev/stdout``, ``/dev/stderr``, ``/dev/fd/N`` or ``/proc/self/fd/N`` names."""
    text = re.sub(r"^/+", "/", os.path.normpath(os.path.abspath(path)))
    if text in _STD_PATHS:
        return _STD_PATHS[text]
    match = _FD_PATH.match(text)
    return int(match.group(1)) if match else None


def _output_kind(path: str | os.PathLike) -> str:
    """``"descriptor"`` (an open descriptor, e.g. ``/dev/stdout``), ``"stream"`` (a FIFO or a character
    device, judged on the file a path finally leads to) or ``"file"`` (put in place by a rename).

    Raises
    ------
    OSError
        For a folder, a block device or a socket, and for a new file in /dev or /proc.
    """
    if _descriptor_of(path) is not None:
        return "descriptor"
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        mode = None
    if mode is not None and (stat.S_ISCHR(mode) or stat.S_ISFIFO(mode)):
        return "stream"
    if mode is not None and not stat.S_ISREG(mode):
        raise OSError(f"{printable_path(path)!r} is {_kind(mode)}; write to a file name instead.")
    parent = os.path.realpath(os.path.dirname(os.path.abspath(path)))
    if parent in ("/dev", "/proc") or parent.startswith(("/dev/", "/proc/")) and not parent.startswith("/dev/shm"):
        raise OSError(f"{printable_path(path)!r} would put a file into {parent}; clipfuse writes no files into /dev "
                      "or /proc. Write to a file name instead.")
    return "file"


def is_stream(path: str | os.PathLike) -> bool:
    """Whether output for ``path`` is written into it (``/dev/stdout``, a FIFO, a character device)
    rather than put in its place; raises OSError for targets no output may go to (see above)."""
    return _output_kind(path) != "file"


@contextlib.contextmanager
def _temporary_beside(path: Path):
    """A new, unique, empty file (yielded as its name) that becomes ``path`` on success.

    For a file it lies beside ``path`` and replaces it in one rename. For a stream or
    an open descriptor it lies in the temporary folder and is copied into the target
    afterwards: written into, never replaced (``/dev/stdout`` from its current offset).
    """
    kind = _output_kind(path)
    folder = path.parent if kind == "file" else None
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.close(fd)
        yield tmp
        if kind == "file":
            os.chmod(tmp, 0o666 & ~_umask())  # after the write: some writers recreate the file with mode 0600
            os.replace(tmp, path)
            return
        target = os.dup(_descriptor_of(path)) if kind == "descriptor" else os.open(path, os.O_WRONLY)
        with open(tmp, "rb") as src, os.fdopen(target, "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.unlink(tmp)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", **open_kwargs):
    """Open a unique temporary file beside ``path``; on success it replaces ``path`` in one rename
    (or, for a stream such as ``/dev/stdout``, is copied into it: see :func:`is_stream`).

    The temporary file is created with ``O_EXCL`` under a random name
    (:func:`tempfile.mkstemp`), so nothing planted beside the target (a symlink at
    ``path.tmp``, a user's own file) is followed or overwritten; a symlink at ``path``
    itself is replaced, never written through. On an error the target is left as it was
    and the temporary file is removed. The new file gets the usual permissions
    (0666 less the umask), as a plain ``open`` would give it.
    """
    with _temporary_beside(Path(path)) as tmp, open(tmp, mode, **open_kwargs) as f:
        yield f
        f.flush()
        os.fsync(f.fileno())


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write a UTF-8 text file atomically (see :func:`atomic_write`)."""
    with atomic_write(path, "w", encoding="utf-8", newline="") as f:
        f.write(text)
    return Path(path)


def write_with(path: str | os.PathLike, write: Callable[[str], object]) -> Path:
    """Atomically write a file through a library function that takes a file name.

    ``write(tmp_name)`` writes the content to a unique temporary name beside ``path``
    (numpy, safetensors, hnswlib and matplotlib all write this way); it then replaces
    ``path`` in one rename.
    """
    path = Path(path)
    with _temporary_beside(path) as tmp:
        write(tmp)
    return path


def _staging_folder(folder: Path, prefix: str) -> Path:
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=prefix))
    os.chmod(staging, 0o777 & ~_umask())  # mkdtemp makes 0700
    return staging


def _fill(staging: Path, fill: Callable[[Path], object]) -> None:
    try:
        fill(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def replace_folder(folder: str | os.PathLike, fill: Callable[[Path], object]) -> Path:
    """Build a folder's new content in a unique staging folder, then swap it in.

    ``fill(staging)`` writes the content. The old folder is renamed aside and the new
    one renamed into place; a crash between the two renames leaves the old content
    under ``<folder>.old-*`` (:func:`leftover_folders` finds it). Staging names are
    unique, so nothing planted beside ``folder`` is written to. For folders that readers
    may open while they are replaced, use :func:`publish_folder`.
    """
    folder = Path(folder)
    staging = _staging_folder(folder, f".{folder.name}.")
    _fill(staging, fill)
    retired = None
    if folder.is_symlink() or folder.exists():
        retired = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f"{folder.name}.old-"))
        os.rmdir(retired)
        os.rename(folder, retired)
    os.rename(staging, folder)
    if retired is not None:
        _remove(retired)
    return folder


def leftover_folders(folder: str | os.PathLike) -> list[Path]:
    """Old content that a crash in :func:`replace_folder` left beside ``folder``, oldest first."""
    folder = Path(folder)
    return sorted(folder.parent.glob(f"{glob.escape(folder.name)}.old-*"), key=lambda p: p.stat().st_mtime)


def publish_folder(link: str | os.PathLike, fill: Callable[[Path], object]) -> Path:
    """Write a new generation of a folder and point ``link`` (a symlink) at it in one step.

    ``fill(generation)`` writes the content into ``<link>.gen-<random>``; then a new
    symlink replaces ``link`` with :func:`os.replace`, which is atomic. A reader that
    resolves ``link`` once (:func:`resolve_published`) reads one whole generation even
    while a writer publishes the next one, and the generation before the current one is
    kept for such readers (older ones are removed). A crash at any point leaves the
    previous generation published. A plain folder at ``link`` (written before
    generations) is moved into a generation first.
    """
    link = Path(link)
    generation = _staging_folder(link, f"{link.name}.gen-")
    _fill(generation, fill)
    previous = os.readlink(link) if link.is_symlink() else None
    if link.exists() and not link.is_symlink():
        legacy = Path(tempfile.mkdtemp(dir=link.parent, prefix=f"{link.name}.gen-"))
        os.rmdir(legacy)
        os.rename(link, legacy)
        previous = legacy.name
    pointer = link.with_name(f".{link.name}.{os.urandom(6).hex()}.link")
    os.symlink(generation.name, pointer)  # relative: the store can be moved or copied whole
    os.replace(pointer, link)
    keep = {generation.name, previous}
    for old in link.parent.glob(f"{link.name}.gen-*"):
        if old.name not in keep:
            _remove(old)
    return link


def resolve_published(link: str | os.PathLike) -> Path | None:
    """The generation folder that ``link`` points to now (or ``link`` itself when it is a
    plain folder); None when there is none."""
    link = Path(link)
    if not link.exists():
        return None
    return link.resolve()


class AtomicFolder:
    """A folder that is only ever replaced whole: stage, swap, and recover from a crash between the two.

    Both kinds of output folder clipfuse replaces go through it:

    - ``generations=False`` (model folders, named by path in a version's model name): the
      new content is staged in a hidden ``.<name>.*`` folder beside it, the old one renamed
      aside (``<name>.old-*``) and the new one renamed into place (:func:`replace_folder`).
    - ``generations=True`` (heads folders, read while retraining): ``path`` is a symlink to
      ``<name>.gen-*``, swapped in one :func:`os.replace` (:func:`publish_folder`), so a
      reader that resolved it once reads one whole generation.

    :meth:`recover` finishes what a crash left: when the folder is missing but its old
    content was renamed aside (killed between the renames), that content is renamed back;
    leftovers of earlier swaps are removed. Only folders that ``owns`` recognises as this
    folder's kind of content are ever restored or removed, so a user's own ``ft.old`` or
    ``ft.tmp`` beside a model folder ``ft`` is left alone; staging folders are removed once
    older than ``stale_after`` seconds (another writer may still be filling a younger one).
    :meth:`replace` runs :meth:`recover` first; :meth:`current` (for readers) changes nothing.
    """

    def __init__(self, path: str | os.PathLike, *, owns: Callable[[Path], bool], generations: bool = False,
                 stale_after: float = 3600.0):
        self.path = Path(path)
        self.owns = owns
        self.generations = generations
        self.stale_after = stale_after

    def _mine(self, paths, *, links: bool = False) -> list[Path]:
        return [p for p in paths if p.is_dir() and (links or not p.is_symlink()) and self.owns(p)]

    def _retired(self) -> list[Path]:
        """Old content renamed aside, oldest first (and, for heads folders written before
        generations, ``<name>.old``)."""
        legacy = [self.path.with_name(self.path.name + ".old")] if self.generations else []
        return self._mine(leftover_folders(self.path)) + self._mine(legacy, links=True)  # the link, renamed

    def _stale(self) -> list[Path]:
        """Staging folders no writer finished (and a heads folder's legacy ``<name>.tmp``)."""
        now = time.time()
        staged = [p for p in self.path.parent.glob(f".{glob.escape(self.path.name)}.*")
                  if now - p.lstat().st_mtime >= self.stale_after]
        legacy = [self.path.with_name(self.path.name + ".tmp")] if self.generations else []
        return self._mine(staged + legacy)

    def recover(self) -> None:
        """Undo or finish an interrupted swap (call it holding whatever keeps writers apart)."""
        retired = self._retired()
        if not (self.path.exists() or self.path.is_symlink()) and retired:
            os.rename(retired.pop(), self.path)  # the newest old content comes back
        for left in retired + self._stale():
            _remove(left)

    def replace(self, fill: Callable[[Path], object]) -> Path:
        """Write new content with ``fill(staging_folder)`` and swap it in; returns ``path``."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.recover()
        return (publish_folder if self.generations else replace_folder)(self.path, fill)

    def current(self) -> Path | None:
        """The folder a reader should read now: the published generation (or the folder itself),
        else, after a crash between the renames, the old content; None when there is none."""
        found = resolve_published(self.path) if self.generations else (self.path if self.path.is_dir() else None)
        if found is not None:
            return found
        retired = self._retired()
        return retired[-1] if retired else None


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


# ---- CSV ---------------------------------------------------------------------------------
def neutralise_cell(value):
    """A text cell that a spreadsheet would run as a formula, made inert with a leading ``'``.

    Cells starting with ``=``, ``+``, ``-``, ``@``, tab or carriage return get the prefix
    (the OWASP rule for CSV injection); numbers and other text are returned unchanged.
    """
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value


def write_csv(path: str | os.PathLike, header: list[str], rows: Iterable[Iterable], *, raw: bool = False) -> Path:
    """Write a CSV atomically, every text cell (header included) neutralised unless ``raw``."""
    fix = (lambda v: v) if raw else neutralise_cell
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([fix(h) for h in header])
    for row in rows:
        writer.writerow([fix(v) for v in row])
    return write_text_atomic(path, buffer.getvalue())


def write_frame_csv(path: str | os.PathLike, df, *, raw: bool = False) -> Path:
    """Write a polars DataFrame as a CSV atomically, text cells and headers neutralised unless ``raw``.

    See :func:`neutralise_cell`; number columns are written as they are.
    """
    import polars as pl

    if not raw:
        starts_like_formula = "^[=+\\-@\t\r]"
        df = df.with_columns([
            pl.when(pl.col(c).str.contains(starts_like_formula)).then(pl.lit("'") + pl.col(c)).otherwise(pl.col(c)).alias(c)
            for c, dtype in df.schema.items() if dtype == pl.String])
        df = df.rename({c: neutralise_cell(c) for c in df.columns if neutralise_cell(c) != c})
    with atomic_write(path) as f:
        df.write_csv(f)
    return Path(path)
