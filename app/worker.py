"""The one model worker: a thread that runs jobs one at a time, in the order they come.

Everything that touches the model or its live factor cache (an ask, a model switch, clearing the cache) runs
here, so generation is serialized whoever asks (web UI, API, CLI), and no lock is ever held across the `yield`
of a generator that Gradio may resume on another thread.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)


class WorkerClosedError(RuntimeError):
    """A job was handed to a worker that was closed."""


class ModelWorker:
    """Runs callables on one daemon thread, started on the first job."""

    def __init__(self, name: str = "tpa-rag-model-worker") -> None:
        self._name = name
        self._jobs: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._closed = False

    def submit(self, job: Callable[[], None]) -> None:
        """Queue `job`; it runs after the jobs before it. Its exceptions are its own to report (logged here)."""
        with self._lock:
            if self._closed:
                raise WorkerClosedError("the model worker is closed")
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name=self._name, daemon=True)
                self._thread.start()
            self._jobs.put(job)

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on the worker, wait for it, and return its value (or raise its exception here)."""
        box: queue.Queue = queue.Queue()

        def job() -> None:
            try:
                box.put((True, fn()))
            except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
                box.put((False, exc))

        self.submit(job)
        ok, value = box.get()
        if not ok:
            raise value
        return value

    def _loop(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            try:
                job()
            except Exception:  # a job reports its own errors; one that escapes must not stop the worker
                log.exception("a model worker job failed")

    def close(self, timeout: float = 60.0) -> None:
        """Let the queued jobs finish, then stop the thread."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            thread = self._thread
            self._jobs.put(None)
        if thread is not None and thread.is_alive():
            thread.join(timeout=timeout)
