"""A spinner on stderr while the chatbot waits for the enclave, drawn only on a terminal.

When stderr is not a terminal (a pipe, a log file, a test) it writes nothing at all.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import TextIO

_FRAMES = "|/-\\"
_CLEAR_LINE = "\r\x1b[K"


class Spinner:
    """`with Spinner("waiting"):` or start()/stop(); stop() is idempotent and clears the line."""

    def __init__(self, label: str, stream: TextIO | None = None, interval_s: float = 0.1) -> None:
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def enabled(self) -> bool:
        isatty = getattr(self.stream, "isatty", None)
        try:
            return bool(isatty and isatty())
        except (OSError, ValueError):  # a closed or detached stream
            return False

    def start(self) -> Spinner:
        if self._thread is None and self.enabled:
            self._thread = threading.Thread(target=self._run, name="spinner", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is None or self._stop.is_set():
            return
        self._stop.set()
        self._thread.join(1.0)
        self._write(_CLEAR_LINE)

    def __enter__(self) -> Spinner:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        started = time.monotonic()
        frame = 0
        while not self._stop.is_set():
            elapsed = time.monotonic() - started
            self._write(f"\r{_FRAMES[frame % len(_FRAMES)]} {self.label} {elapsed:.0f}s")
            frame += 1
            self._stop.wait(self.interval_s)

    def _write(self, text: str) -> None:
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):  # the terminal went away: the spinner is cosmetic
            pass
