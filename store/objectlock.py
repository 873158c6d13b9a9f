"""The writer lock of a store on S3: a lease object written with conditional puts, renewed while held."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from urllib.parse import urlparse

LEASE_KEY = "_writer.lock"
LEASE_SECONDS = 30.0  # a holder that stops renewing (killed, cut off) loses the lock after this long


def s3_client(storage_options: dict | None = None):
    """A boto3 S3 client from LanceDB-style storage options, falling back to the AWS_* variables."""
    try:
        import boto3
        from botocore.config import Config
    except ImportError as e:
        raise ImportError("stores on s3:// need boto3 for their writer lock: pip install 'clipfuse[s3]'.") from e
    opts = {k.lower(): v for k, v in (storage_options or {}).items()}

    def pick(*names):
        for name in names:
            if opts.get(name):
                return opts[name]
        return None

    return boto3.client(
        "s3",
        endpoint_url=pick("endpoint", "aws_endpoint", "aws_endpoint_url") or os.environ.get("AWS_ENDPOINT_URL"),
        aws_access_key_id=pick("aws_access_key_id", "access_key_id"),
        aws_secret_access_key=pick("aws_secret_access_key", "secret_access_key"),
        aws_session_token=pick("aws_session_token", "session_token"),
        region_name=pick("region", "aws_region") or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        or "us-east-1",
        config=Config(retries={"max_attempts": 3, "mode": "standard"}),
    )


def _machine() -> dict:
    """What tells this machine (and pid namespace) apart: a holder recorded with the same values and a pid that is
    not running is certainly gone, so its lease needs no waiting out."""
    def read(path):
        try:
            with open(path) as f:
                return f.read().strip()
        except OSError:
            return None

    try:
        pidns = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        pidns = None
    return {"host": socket.gethostname(), "boot": read("/proc/sys/kernel/random/boot_id"), "pidns": pidns}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def holder_is_gone(record: dict) -> bool:
    """Whether the lease's holder ran on this machine, in this pid namespace, and its process has exited."""
    here = _machine()
    if here["boot"] is None or here["pidns"] is None or not isinstance(record.get("pid"), int):
        return False
    if any(record.get(k) != here[k] for k in ("host", "boot", "pidns")):
        return False
    return not _pid_alive(record["pid"])


def _code(error) -> str:
    return str(getattr(error, "response", {}).get("Error", {}).get("Code", ""))


NOT_FOUND = ("NoSuchKey", "404")  # error codes of an object that is not there
CONFLICT = ("PreconditionFailed", "ConditionalRequestConflict", "412", "409")  # a conditional put lost


class S3Lease:
    """One store's writer lease: the object ``<prefix>/_writer.lock`` on S3.

    Taking it is a put with ``If-None-Match: *`` (only one writer can create the object);
    a thread renews it with ``If-Match`` on the holder's own ETag every third of
    ``lease_seconds``, so a second writer sees a live holder and waits. A holder that
    dies stops renewing: once its lease has expired, the next writer takes the object
    over with a conditional put on the expired ETag (two such writers can't both win).
    A holder whose renewal fails (the lease was taken over after a long stall) knows it
    lost the lock: :meth:`check` raises, and the store's next write stops.
    """

    def __init__(self, uri: str, storage_options: dict | None = None, *, lease_seconds: float = LEASE_SECONDS):
        parsed = urlparse(uri)
        self.uri = uri
        self.bucket = parsed.netloc
        self.key = f"{parsed.path.strip('/')}/{LEASE_KEY}".lstrip("/")
        self.lease_seconds = lease_seconds
        self._client = s3_client(storage_options)
        self._etag: str | None = None
        self._record: dict = {}
        self._lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- the object -----------------------------------------------------------------------
    def _body(self, what: str, token: str) -> bytes:
        self._record = {"pid": os.getpid(), **_machine(), "what": what, "token": token,
                        "since": self._record.get("since", time.time()), "expires": time.time() + self.lease_seconds}
        return json.dumps(self._record).encode()

    def _errors(self, error) -> OSError:
        code = _code(error)
        if code == "NoSuchBucket":
            return FileNotFoundError(f"the bucket {self.bucket!r} of store {self.uri!r} does not exist; create it, or "
                                     "check the --db URI.")
        if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken"):
            return PermissionError(f"store {self.uri!r}: the object store refused the credentials ({code}); check "
                                   "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or the --storage-option keys.")
        return OSError(f"store {self.uri!r}: the writer lock could not be written ({code or error}).")

    def holder(self) -> tuple[dict, str | None]:
        """The current lease record and its ETag ({} and None when nobody holds the store)."""
        from botocore.exceptions import ClientError

        try:
            got = self._client.get_object(Bucket=self.bucket, Key=self.key)
        except ClientError as e:
            if _code(e) in NOT_FOUND:
                return {}, None
            raise self._errors(e) from e
        try:
            record = json.loads(got["Body"].read().decode() or "{}")
        except ValueError:
            record = {}
        return record, got["ETag"]

    def try_acquire(self, what: str) -> dict | None:
        """Take the lease if it is free or expired; else return the live holder's record."""
        from botocore.exceptions import ClientError

        token = uuid.uuid4().hex
        self._record = {}
        try:
            put = self._client.put_object(Bucket=self.bucket, Key=self.key, Body=self._body(what, token),
                                          IfNoneMatch="*")
            self._etag = put["ETag"]
            return None
        except ClientError as e:
            if _code(e) not in CONFLICT:
                raise self._errors(e) from e
        record, etag = self.holder()
        if etag is None:
            return self.try_acquire(what)  # released in between
        if record.get("expires", 0) > time.time() and not holder_is_gone(record):
            return record
        try:  # expired (its holder stopped renewing) or its holder here has exited: only one writer can replace it
            self._record = {}
            put = self._client.put_object(Bucket=self.bucket, Key=self.key, Body=self._body(what, token), IfMatch=etag)
            self._etag = put["ETag"]
            return None
        except ClientError as e:
            if _code(e) not in CONFLICT:
                raise self._errors(e) from e
            return self.holder()[0] or {"what": "another writer"}

    # ---- holding ---------------------------------------------------------------------------
    def start_renewing(self) -> None:
        self._lost = None
        self._stop.clear()
        self._thread = threading.Thread(target=self._renew, name="clipfuse-s3-lease", daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        from botocore.exceptions import ClientError

        while not self._stop.wait(self.lease_seconds / 3):
            try:
                put = self._client.put_object(Bucket=self.bucket, Key=self.key, IfMatch=self._etag,
                                              Body=self._body(self._record.get("what", ""), self._record["token"]))
                self._etag = put["ETag"]
            except ClientError as e:
                if _code(e) in CONFLICT + NOT_FOUND:
                    self._lost = "its lease was taken over by another writer (this one stalled past the lease)"
                    return
            except Exception:  # a network blip: the next renewal tries again, well within the lease
                continue

    def check(self) -> None:
        """Raise if the lease was lost while held (another writer may have started)."""
        if self._lost:
            raise OSError(f"the writer lock of store {self.uri!r} was lost: {self._lost}; this command stops here "
                          "(what it committed is complete). Run it again.")

    def release(self) -> None:
        from botocore.exceptions import ClientError

        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self._etag is None or self._lost:
            return
        record, etag = self.holder()
        if record.get("token") == self._record.get("token"):  # still ours: never delete another writer's lease
            try:
                self._client.delete_object(Bucket=self.bucket, Key=self.key)
            except ClientError:
                pass  # it expires on its own
        self._etag = None
