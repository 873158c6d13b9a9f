"""Image folders on object storage (``s3://bucket/train``, ``gs://...``, ``az://...``): list and read them.

Paths stay full URIs everywhere (the store's ``path`` column, error rows, exports), so a file is
named the same way on every machine. Access goes through pyarrow's filesystems, which every
installation of clipfuse already has (LanceDB depends on pyarrow), so Ray workers need nothing more.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from urllib.parse import urlparse

from .files import FileTooLargeError, _too_large

SCHEMES = ("s3", "gs", "gcs", "az", "abfs", "abfss")


def is_uri(path) -> bool:
    """Whether ``path`` names an object on object storage rather than a local file."""
    return isinstance(path, str) and "://" in path and path.split("://", 1)[0].lower() in SCHEMES


@dataclass(frozen=True)
class RemoteFile:
    """One object listed under a folder URI."""

    uri: str
    size: int
    mtime: float  # the object's last-modified time, seconds since the epoch


def _s3_options(storage_options: dict | None) -> dict:
    """pyarrow ``S3FileSystem`` arguments from LanceDB-style storage options and the AWS_* variables."""
    opts = {str(k).lower(): str(v) for k, v in (storage_options or {}).items()}

    def pick(*names, env=None):
        for name in names:
            if opts.get(name):
                return opts[name]
        return os.environ.get(env) if env else None

    endpoint = pick("endpoint", "aws_endpoint", "aws_endpoint_url", env="AWS_ENDPOINT_URL")
    kwargs = {
        "access_key": pick("aws_access_key_id", "access_key_id", env="AWS_ACCESS_KEY_ID"),
        "secret_key": pick("aws_secret_access_key", "secret_access_key", env="AWS_SECRET_ACCESS_KEY"),
        "session_token": pick("aws_session_token", "session_token", env="AWS_SESSION_TOKEN"),
        "region": pick("region", "aws_region", env="AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
    }
    if endpoint:
        parsed = urlparse(endpoint)
        kwargs["endpoint_override"] = parsed.netloc or parsed.path
        kwargs["scheme"] = parsed.scheme or "https"
    return {k: v for k, v in kwargs.items() if v is not None}


@functools.lru_cache(maxsize=16)
def _filesystem(scheme: str, options: tuple):
    from pyarrow import fs

    if scheme == "s3":
        return fs.S3FileSystem(**dict(options))
    if scheme in ("gs", "gcs"):
        return fs.GcsFileSystem()
    return fs.AzureFileSystem(**dict(options)) if options else fs.AzureFileSystem(account_name=os.environ.get(
        "AZURE_STORAGE_ACCOUNT_NAME", ""))


def filesystem(uri: str, storage_options: dict | None = None):
    """``(pyarrow filesystem, path inside it)`` for a URI; one filesystem object per process and options."""
    scheme, rest = uri.split("://", 1)
    scheme = scheme.lower()
    options = tuple(sorted(_s3_options(storage_options).items())) if scheme == "s3" else ()
    if scheme in ("az", "abfs", "abfss"):
        opts = {str(k).lower(): str(v) for k, v in (storage_options or {}).items()}
        name = opts.get("account_name") or os.environ.get("AZURE_STORAGE_ACCOUNT_NAME")
        key = opts.get("account_key") or os.environ.get("AZURE_STORAGE_ACCOUNT_KEY")
        options = tuple((k, v) for k, v in (("account_name", name), ("account_key", key)) if v)
    return _filesystem(scheme, options), rest.rstrip("/")


def _describe(uri: str, e: Exception) -> OSError:
    """A clear error for a refused or failed listing/read of ``uri``."""
    text = str(e)
    bucket = uri.split("://", 1)[1].split("/", 1)[0]
    squashed = text.upper().replace("_", "")
    if "NOSUCHBUCKET" in squashed or "bucket does not exist" in text.lower():
        return FileNotFoundError(f"the bucket {bucket!r} of {uri!r} does not exist; check the URI.")
    for code in ("ACCESSDENIED", "INVALIDACCESSKEYID", "SIGNATUREDOESNOTMATCH", "EXPIREDTOKEN", "INVALIDTOKEN"):
        if code in squashed:
            return PermissionError(f"{uri!r}: the object store refused the credentials ({code.lower()}); check "
                                   "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or the --storage-option keys.")
    if "Connection refused" in text or "connect" in text.lower() and "fail" in text.lower():
        return ConnectionError(f"{uri!r}: the object store can't be reached ({text[:200]}); check the endpoint "
                               "(AWS_ENDPOINT_URL or --storage-option endpoint=...).")
    return OSError(f"{uri!r}: {text[:300]}")


def list_files(uri: str, storage_options: dict | None = None) -> list[RemoteFile]:
    """Every object under the folder ``uri`` (recursively), sorted by URI.

    Raises FileNotFoundError when nothing is there (a folder on object storage exists only
    through the objects under it), with the reason when the bucket is missing or the
    credentials are refused.
    """
    from pyarrow import fs as pafs

    fsys, path = filesystem(uri, storage_options)
    scheme = uri.split("://", 1)[0]
    try:
        infos = fsys.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    except Exception as e:  # pyarrow raises OSError subclasses with the service's message
        raise _describe(uri, e) from e
    files = [RemoteFile(f"{scheme}://{info.path}", int(info.size or 0),
                        info.mtime.timestamp() if info.mtime is not None else 0.0)
             for info in infos if info.type == pafs.FileType.File]
    if not files:
        bucket = path.split("/", 1)[0]
        try:
            missing = fsys.get_file_info(bucket).type == pafs.FileType.NotFound
        except Exception as e:
            raise _describe(uri, e) from e
        if missing:
            raise FileNotFoundError(f"the bucket {bucket!r} of {uri!r} does not exist; check the URI.")
        raise FileNotFoundError(f"no objects under {uri!r}; check the URI (a folder on object storage is the prefix "
                                "of its objects).")
    return sorted(files, key=lambda f: f.uri)


def read_object(uri: str, *, max_bytes: int | None, storage_options: dict | None = None) -> tuple[bytes, int, float]:
    """``(data, size, mtime)`` of one object, refusing one larger than ``max_bytes``.

    Raises OSError (with the service's reason) when it can't be read, FileTooLargeError when too large.
    """
    from pyarrow import fs as pafs

    fsys, path = filesystem(uri, storage_options)
    try:
        info = fsys.get_file_info(path)
        if info.type != pafs.FileType.File:
            raise FileNotFoundError(f"no object {uri!r}")
        if max_bytes is not None and info.size is not None and info.size > max_bytes:
            raise FileTooLargeError(_too_large(info.size, max_bytes))
        with fsys.open_input_stream(path) as f:
            data = f.read() if max_bytes is None else f.read(max_bytes + 1)
    except (FileTooLargeError, FileNotFoundError):
        raise
    except Exception as e:
        raise _describe(uri, e) from e
    if max_bytes is not None and len(data) > max_bytes:
        raise FileTooLargeError(_too_large(len(data), max_bytes))
    return data, len(data), info.mtime.timestamp() if info.mtime is not None else 0.0


def listed_objects(paths, storage_options: dict | None = None) -> dict[str, tuple[int, float]]:
    """``{uri: (size, mtime)}`` of the objects among ``paths`` (local paths are ignored) that exist: one
    listing per folder that holds them, rather than a request per object."""
    import posixpath

    from pyarrow import fs as pafs

    wanted: dict[str, set[str]] = {}
    for p in paths:
        if is_uri(p):
            wanted.setdefault(posixpath.dirname(p), set()).add(p)
    found = {}
    for folder, uris in wanted.items():
        fsys, path = filesystem(folder, storage_options)
        scheme = folder.split("://", 1)[0]
        try:
            infos = fsys.get_file_info(pafs.FileSelector(path, recursive=False, allow_not_found=True))
        except Exception as e:
            raise _describe(folder, e) from e
        for info in infos:
            uri = f"{scheme}://{info.path}"
            if uri in uris and info.type == pafs.FileType.File:
                found[uri] = (int(info.size or 0), info.mtime.timestamp() if info.mtime is not None else 0.0)
    return found
