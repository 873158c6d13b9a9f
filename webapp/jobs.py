"""The review app's writes: one thread applies label changes and retrains, in order, from a journal on disk.

A label change is appended to the journal (fsync'd) before the request is answered, then applied by the
writer thread. A retrain holds the store's writer lock for minutes; changes made meanwhile wait in the
journal and are applied when it ends, and a server that stops first applies them when it starts again.
"""

from __future__ import annotations

import json
import os
import queue
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional


@dataclass
class RetrainStatus:
    state: str = "idle"  # idle, queued, running, done, failed
    stage: str = ""
    done: int = 0
    total: Optional[int] = None
    started: Optional[float] = None
    finished: Optional[float] = None
    error: Optional[str] = None
    result: dict = field(default_factory=dict)  # fused accuracy, heads, images predicted
    runs: int = 0  # retrains finished since the server started

    def to_dict(self) -> dict:
        return asdict(self)


class Writer:
    """Applies label changes and retrains to one workspace, one at a time, in the order asked."""

    def __init__(self, ws, journal: Path, *, heads: str | None = None, folds: int = 3):
        self.ws, self.journal, self.heads, self.folds = ws, Path(journal), heads, folds
        self.applied_file = self.journal.with_suffix(".applied")
        self.status = RetrainStatus()
        self.undo: list[dict] = []  # changes made through the app, newest last: id, before, after
        self._queue: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._seq = 0
        self._applied = 0
        self._done = threading.Condition()
        self._errors: dict[int, str] = {}
        self._waiting: dict[str, list] = {}  # id -> [label after its newest journaled change, changes not applied]
        self._thread = threading.Thread(target=self._run, name="clipfuse-serve-writer", daemon=True)
        self.journal.parent.mkdir(parents=True, exist_ok=True)
        self._recover()
        self._thread.start()

    # ---- the journal ---------------------------------------------------------------------------
    def _recover(self) -> None:
        """Queue again the journal's changes that a server stopped before applying."""
        applied = int(self.applied_file.read_text() or 0) if self.applied_file.exists() else 0
        pending = []
        if self.journal.exists():
            for line in self.journal.read_text(encoding="utf-8").splitlines():
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue  # a line torn by a crash while it was written: its request was never answered
                self._seq = max(self._seq, entry["seq"])
                if entry["seq"] > applied:
                    pending.append(entry)
        self._applied = applied if not pending else pending[0]["seq"] - 1
        for entry in pending:
            self._note_waiting(entry)
            self._queue.put(("label", entry))

    def _note_waiting(self, entry: dict) -> None:
        waiting = self._waiting.setdefault(entry["id"], [None, 0])
        waiting[0], waiting[1] = entry["label"], waiting[1] + 1

    def label_now(self, image_id: str, stored: str | None) -> str | None:
        """The image's label once the changes already journaled for it are written (``stored`` if none wait)."""
        with self._lock:
            waiting = self._waiting.get(image_id)
            return waiting[0] if waiting else stored

    def _append(self, entry: dict) -> None:
        with open(self.journal, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def _mark_applied(self, seq: int) -> None:
        tmp = self.applied_file.with_name(self.applied_file.name + ".tmp")
        tmp.write_text(str(seq))
        os.replace(tmp, self.applied_file)

    # ---- what requests call ----------------------------------------------------------------------
    def label(self, image_id: str, label: str | None, before: str | None, *, action: str = "label",
              wait: float = 10.0) -> dict:
        """Journal one change and apply it (waiting up to ``wait`` s); ``queued`` says it waits for a retrain."""
        with self._lock:
            self._seq += 1
            entry = {"seq": self._seq, "id": image_id, "label": label, "before": before, "action": action,
                     "at": time.time()}
            self._append(entry)
            self._note_waiting(entry)
            if action == "undo":
                if self.undo and self.undo[-1]["id"] == image_id:
                    self.undo.pop()
            else:
                self.undo.append({"id": image_id, "before": before, "after": label, "seq": entry["seq"]})
            self._queue.put(("label", entry))
        busy = self.status.state in ("queued", "running")
        if busy:
            return {"seq": entry["seq"], "state": "queued"}
        with self._done:
            self._done.wait_for(lambda: self._applied >= entry["seq"], timeout=wait)
        if entry["seq"] in self._errors:
            return {"seq": entry["seq"], "state": "failed", "error": self._errors.pop(entry["seq"])}
        return {"seq": entry["seq"], "state": "written" if self._applied >= entry["seq"] else "queued"}

    def last_change(self) -> dict | None:
        """The newest change made through the app that undo would take back."""
        with self._lock:
            return dict(self.undo[-1]) if self.undo else None

    def pending(self) -> int:
        """Label changes journaled and not yet applied."""
        return max(0, self._seq - self._applied)

    def retrain(self) -> RetrainStatus:
        if self.status.state in ("queued", "running"):
            return self.status
        runs = self.status.runs
        self.status = RetrainStatus(state="queued", started=time.time(), runs=runs)
        self._queue.put(("retrain", None))
        return self.status

    def wait_idle(self, timeout: float = 60.0) -> bool:
        """Wait until every queued change and retrain is done (for tests and shutdown)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self._queue.unfinished_tasks == 0:
                return True
            time.sleep(0.05)
        return False

    # ---- the thread -----------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            kind, entry = self._queue.get()
            try:
                if kind == "label":
                    self._apply(entry)
                else:
                    self._retrain()
            finally:
                self._queue.task_done()

    def _apply(self, entry: dict) -> None:
        try:
            if entry["label"] is None:
                self.ws.label(entry["id"], remove=True)
            else:
                self.ws.label(entry["id"], entry["label"])
        except Exception as e:  # noqa: BLE001 - the request checked the input; a store error is reported back
            self._errors[entry["seq"]] = str(e)
            with self._lock:
                self.undo = [u for u in self.undo if u["seq"] != entry["seq"]]
        self._mark_applied(entry["seq"])
        with self._lock:
            waiting = self._waiting.get(entry["id"])
            if waiting is not None:
                waiting[1] -= 1
                if waiting[1] <= 0:
                    del self._waiting[entry["id"]]
        with self._done:
            self._applied = entry["seq"]
            self._done.notify_all()

    def _retrain(self) -> None:
        status = self.status
        status.state = "running"

        def progress(stage, done, total):
            status.stage, status.done, status.total = str(stage), int(done), total

        try:
            trained = self.ws.train_heads(heads=self.heads, folds=self.folds, progress=progress)
            status.stage, status.done, status.total = "predicting", 0, None
            predicted = self.ws.predict(per_head=True, progress=progress)
            accuracy = trained.fused_accuracy  # NaN with one label per class: nothing held out
            status.result = {"fused_accuracy": None if accuracy != accuracy else accuracy, "heads": trained.heads,
                             "images": predicted.images, "n_train": trained.n_train, "n_val": trained.n_val}
            status.state = "done"
        except Exception as e:  # noqa: BLE001 - shown on the page, the server goes on
            status.state, status.error = "failed", f"{type(e).__name__}: {e}"
        status.finished = time.time()
        status.runs += 1
