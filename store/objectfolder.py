"""Folders beside a store on S3 (trained heads): files published in generations, read through a local cache."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Callable
from urllib.parse import urlparse

from .objectlock import NOT_FOUND, _code, s3_client

CURRENT = "CURRENT"  # the object naming the current generation: one put switches readers to a new one


def cache_root() -> Path:
    """Where generations read from object storage are kept on this machine (``$XDG_CACHE_HOME/clipfuse``)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "clipfuse" / "stores"


class ObjectFolder:
    """A folder of files kept on S3 beside a store, with the interface of :class:`clipfuse.data.AtomicFolder`.

    The files of each generation are objects under ``<prefix>/<name>/<generation>/``; the
    object ``<prefix>/<name>/CURRENT`` names the current generation. :meth:`replace` uploads
    a new generation whole, then switches ``CURRENT`` in one put, so a reader sees the old
    generation or the new one, never a mix; a crash leaves the old one current (and at most
    an orphan generation, removed by a later replace). The generation before the current one
    is kept, for readers that are still downloading it. :meth:`current` downloads the current generation once into a local
    cache (generations never change once published) and returns that folder.
    """

    def __init__(self, store_uri: str, name: str, storage_options: dict | None = None, *,
                 cache: Path | None = None):
        parsed = urlparse(store_uri)
        self.uri = store_uri
        self.bucket = parsed.netloc
        self.prefix = f"{parsed.path.strip('/')}/{name.strip('/')}".strip("/")
        self._client = s3_client(storage_options)
        digest = hashlib.sha256(store_uri.encode()).hexdigest()[:16]
        self.cache = (cache or cache_root()) / digest / name.strip("/")

    def _get_current(self) -> str | None:
        from botocore.exceptions import ClientError

        try:
            body = self._client.get_object(Bucket=self.bucket, Key=f"{self.prefix}/{CURRENT}")["Body"].read()
        except ClientError as e:
            if _code(e) in NOT_FOUND:
                return None
            raise OSError(f"store {self.uri!r}: can't read {self.prefix}/{CURRENT} ({_code(e) or e}).") from e
        return body.decode().strip() or None

    def _keys(self, generation: str) -> list[str]:
        keys, token = [], None
        while True:
            kwargs = {"Bucket": self.bucket, "Prefix": f"{self.prefix}/{generation}/"}
            if token:
                kwargs["ContinuationToken"] = token
            page = self._client.list_objects_v2(**kwargs)
            keys += [o["Key"] for o in page.get("Contents", [])]
            if not page.get("IsTruncated"):
                return keys
            token = page["NextContinuationToken"]

    def current(self) -> Path | None:
        """The current generation as a local folder (downloaded on first use), or None when there is none."""
        generation = self._get_current()
        if generation is None:
            return None
        local = self.cache / generation
        if local.is_dir():
            return local
        self.cache.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{generation}.", dir=self.cache))
        try:
            for key in self._keys(generation):
                self._client.download_file(self.bucket, key, str(staging / key.rsplit("/", 1)[1]))
            try:
                staging.rename(local)  # a generation is immutable: whoever renames first, the content is the same
            except OSError:
                if not local.is_dir():
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return local

    def replace(self, fill: Callable[[Path], None]) -> Path:
        """Fill a new generation locally, upload it, make it current; returns its local folder."""
        previous = self._get_current()
        generation = f"gen-{int(time.time())}-{uuid.uuid4().hex[:8]}"
        self.cache.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{generation}.", dir=self.cache))
        try:
            fill(staging)
            for path in sorted(p for p in staging.iterdir() if p.is_file()):
                self._client.upload_file(str(path), self.bucket, f"{self.prefix}/{generation}/{path.name}")
            self._client.put_object(Bucket=self.bucket, Key=f"{self.prefix}/{CURRENT}", Body=generation.encode())
            local = self.cache / generation
            staging.rename(local)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        # the previous generation stays (a reader on another machine may be downloading it now); older go
        for old in self._generations():
            if old not in (generation, previous):
                for key in self._keys(old):
                    self._client.delete_object(Bucket=self.bucket, Key=key)
                shutil.rmtree(self.cache / old, ignore_errors=True)
        return local

    def _generations(self) -> list[str]:
        return self.children()

    def children(self) -> list[str]:
        """Names of the sub-folders (prefixes) directly under this folder: its generations, or, for ``_heads``,
        the saved heads folders."""
        names, token = [], None
        while True:
            kwargs = {"Bucket": self.bucket, "Prefix": f"{self.prefix}/", "Delimiter": "/"}
            if token:
                kwargs["ContinuationToken"] = token
            page = self._client.list_objects_v2(**kwargs)
            names += [p["Prefix"][len(self.prefix) + 1:].rstrip("/") for p in page.get("CommonPrefixes", [])]
            if not page.get("IsTruncated"):
                return names
            token = page["NextContinuationToken"]

    def remove(self) -> None:
        """Delete every generation and the CURRENT pointer (pointer first: readers then see no folder)."""
        from botocore.exceptions import ClientError

        try:
            self._client.delete_object(Bucket=self.bucket, Key=f"{self.prefix}/{CURRENT}")
        except ClientError as e:
            if _code(e) not in NOT_FOUND:
                raise
        for generation in self._generations():
            for key in self._keys(generation):
                self._client.delete_object(Bucket=self.bucket, Key=key)
        shutil.rmtree(self.cache, ignore_errors=True)
