"""Requests to save and stop: a stop file holding a step number (InternLM's stop_file_path) and
SIGTERM/SIGINT, recorded so the step loop finishes its step, saves and exits 0.

Both are per process: under several ranks the trainer must agree on the decision (e.g. all_reduce a
flag with MAX each step) before a collective save, since ranks may read the file or get the signal at
slightly different times.
"""

import signal
import sys
import threading
import warnings
from pathlib import Path


class StopFile:
    """stop_file_path: a file whose content is a step number; the run saves at that step and stops.

    A number not after `start_step` (the step the run started or resumed at) is left from an earlier run:
    it is ignored with a warning instead of stopping the new run at once."""

    def __init__(self, path: str | None, start_step: int = 0):
        self.path = Path(path) if path else None
        self.start_step = start_step
        self._seen: tuple | None = None  # (mtime_ns, size) of the content last parsed
        self._step: int | None = None

    def requested_step(self) -> int | None:
        """The step the file asks to stop at, or None (no file, empty, stale or unreadable)."""
        if self.path is None:
            return None
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            self._seen, self._step = None, None
            return None
        if self._seen == (stat.st_mtime_ns, stat.st_size):
            return self._step
        self._seen, self._step = (stat.st_mtime_ns, stat.st_size), None
        text = self.path.read_text().strip()
        if not text:
            return None
        try:
            step = int(text)
        except ValueError:
            warnings.warn(f"stop file {self.path} holds {text[:40]!r}, not a step number: ignored", stacklevel=2)
            return None
        if step <= self.start_step:
            warnings.warn(
                f"stop file {self.path} asks to stop at step {step}, not after this run's start ({self.start_step}): "
                "ignored (left from an earlier run?)",
                stacklevel=2,
            )
            return None
        self._step = step
        return step

    def should_stop(self, step: int) -> bool:
        """True once `step` (the step just finished) reaches the requested one: save and stop there."""
        requested = self.requested_step()
        return requested is not None and step >= requested


class StopSignal:
    """Records SIGTERM/SIGINT instead of dying, so the loop can finish the step, save and exit 0.

    A second signal of the same kind is handed to the handler that was there before (Ctrl-C twice still
    interrupts at once). A signal the process started with ignored (SIG_IGN: a shell's background job
    ignores SIGINT, so that Ctrl-C at the terminal reaches only the foreground job) stays ignored, as Python
    itself leaves it: whoever started the run chose that it must not stop on it. uninstall() puts the
    previous handlers back. Use as a context manager or with install()/uninstall(), from the main thread
    (Python only delivers signals there)."""

    def __init__(self, signals=(signal.SIGTERM, signal.SIGINT)):
        self.signals = tuple(signals)
        self.signum: int | None = None
        self._previous: dict[int, object] = {}  # the handlers replaced (ignored signals are left alone)
        self._installed = False

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def install(self) -> "StopSignal":
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("StopSignal.install() must run in the main thread (Python delivers signals there)")
        if self._installed:
            raise RuntimeError("StopSignal is already installed")
        self._installed = True
        for signum in self.signals:
            if signal.getsignal(signum) is not signal.SIG_IGN:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def uninstall(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous, self._installed = {}, False

    def _handle(self, signum, frame) -> None:
        if self.signum == signum:
            previous = self._previous.get(signum)
            self.uninstall()
            if callable(previous):
                previous(signum, frame)
            else:
                signal.raise_signal(signum)  # SIG_DFL: terminate as if never caught
            return
        self.signum = signum
        print(
            f"pytrain: {signal.Signals(signum).name} received: finishing this step, saving a checkpoint, then "
            "exiting (send it again to stop at once)",
            file=sys.stderr,
            flush=True,
        )

    def __enter__(self) -> "StopSignal":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.uninstall()
