"""A run's alerts as JSON lines appended to monitor.alert.alert_file_path: what InternLM's light monitor and
Feishu hook report, written to a file instead of a network address.

One line per alert: {"time", "job", "rank", "host", "alert", ...}, where "alert" is
  skipped_step   a step whose gradients held inf/NaN was skipped (step, grad_norm);
  loss_spike     a step's loss exceeded loss_spike_limit x the previous step's (step, loss, previous_loss),
                 InternLM's check with its fixed 1.5 as the default;
  run_finished   the last step ran (step);
  run_failed     an exception ended the run on this rank (step, error, traceback); an uncaught SIGTERM too.
Step alerts come from the first rank (the loss is averaged over the data-parallel ranks); failures from the
rank that saw them. Lines are appended whole with one write each, so ranks sharing the file do not interleave.
"""

import contextlib
import json
import math
import signal
import socket
import threading
import time
import traceback
from pathlib import Path


def _plain_number(value):
    """JSON has no inf/NaN: those are written as strings."""
    return value if not isinstance(value, float) or math.isfinite(value) else str(value)


class AlertLog:
    def __init__(self, path, job_name: str, rank: int = 0, loss_spike_limit: float = 1.5):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.job_name, self.rank, self.loss_spike_limit = job_name, rank, loss_spike_limit
        self._previous_loss: float | None = None

    @classmethod
    def from_config(cls, cfg, rank: int) -> "AlertLog | None":
        """The run's alert log, or None without monitor.alert.alert_file_path."""
        alert = cfg.monitor.alert
        if alert.alert_file_path is None:
            return None
        return cls(alert.alert_file_path, str(cfg.get("JOB_NAME", "pytrain")), rank, alert.loss_spike_limit)

    def write(self, alert: str, **fields) -> dict:
        record = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "job": self.job_name,
            "rank": self.rank,
            "host": socket.gethostname(),
            "alert": alert,
            **{key: _plain_number(value) for key, value in fields.items()},
        }
        with open(self.path, "a") as file:
            file.write(json.dumps(record) + "\n")
        return record

    def step(self, step: int, loss: float, grad_norm: float, skipped: bool) -> None:
        """Checks one step's result (the first rank calls it after each step)."""
        if skipped:
            self.write("skipped_step", step=step, grad_norm=grad_norm, message="inf/NaN gradients: step skipped")
            return
        if not math.isfinite(loss):
            return
        previous = self._previous_loss
        if previous is not None and loss > self.loss_spike_limit * previous:
            self.write(
                "loss_spike",
                step=step,
                loss=loss,
                previous_loss=previous,
                message=f"loss rose from {previous:.4f} to {loss:.4f} (more than {self.loss_spike_limit:g}x)",
            )
        self._previous_loss = loss

    def finished(self, step: int) -> None:
        self.write("run_finished", step=step)

    def failed(self, error: BaseException, step: int) -> None:
        lines = traceback.format_exception(type(error), error, error.__traceback__)
        self.write("run_failed", step=step, error=f"{type(error).__name__}: {error}", traceback="".join(lines[-10:]))

    @contextlib.contextmanager
    def watch(self, last_step):
        """Around the training loop: an exception writes run_failed with last_step() before it propagates.
        SIGTERM (how torchrun stops the other ranks when one dies) counts too: where it would kill the process
        outright (its default action), it is raised as SystemExit(143) instead; a handler already installed
        (pytrain.checkpoint's graceful stop) is left in charge."""
        on_main_thread = threading.current_thread() is threading.main_thread()
        takes_sigterm = on_main_thread and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL

        def stop(signum, frame):
            raise SystemExit(128 + signum)

        if takes_sigterm:
            signal.signal(signal.SIGTERM, stop)
        try:
            yield self
        except BaseException as error:
            self.failed(error, last_step())
            raise
        finally:
            if takes_sigterm:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
