"""Ingestion progress on the terminal: files and chunks done, with an estimate of the time left.

On a terminal it is a tqdm bar over the files (tqdm computes the estimate) with the chunks embedded beside it;
elsewhere (`make run` piped to a log, a container's output) one plain line every few seconds, so a first run that
indexes for minutes always says what it is doing.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

PLAIN_EVERY_S = 5.0


class IngestProgressBar:
    """A `retrieval` progress callback (`IngestProgress` events); `close()` when the ingestion ends."""

    def __init__(self, stream: TextIO | None = None, *, terminal: bool | None = None) -> None:
        self._stream = stream or sys.stderr
        self._terminal = self._stream.isatty() if terminal is None else terminal
        self._bar = None
        self._started = time.monotonic()
        self._last_line = 0.0
        self._last = None

    def __call__(self, event) -> None:  # retrieval.records.IngestProgress
        self._last = event
        if self._terminal:
            self._update_bar(event)
            return
        now = time.monotonic()
        if now - self._last_line >= PLAIN_EVERY_S:
            self._print_line(event, now)

    def _update_bar(self, event) -> None:
        if self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(total=event.files_total, unit="file", file=self._stream, dynamic_ncols=True)
        self._bar.total = event.files_total
        self._bar.n = event.files_done
        self._bar.set_postfix_str(f"{event.chunks_embedded:,} chunks embedded", refresh=False)
        self._bar.refresh()

    def _print_line(self, event, now: float) -> None:
        self._last_line = now
        print(f"tpa-rag: indexed {event.files_done:,}/{event.files_total:,} files, {event.chunks_embedded:,} "
              f"chunks embedded{self._estimate(event, now - self._started)}", file=self._stream, flush=True)

    @staticmethod
    def _estimate(event, elapsed: float) -> str:
        """Time left if the remaining files go at the pace of those done so far."""
        if not event.files_done or event.files_done >= event.files_total or elapsed < 1:
            return ""
        left = elapsed * (event.files_total - event.files_done) / event.files_done
        return f", about {left / 60:.0f} min left" if left >= 120 else f", about {left:.0f} s left"

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif not self._terminal and self._last is not None:
            self._print_line(self._last, time.monotonic())
