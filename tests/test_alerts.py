"""monitor.alert.alert_file_path (one JSON line per alert), monitor.peak_tflops, monitor.tensorboard.queue_max_length
and the start line's "ignored here" list, in a unit test each and in one real run."""

import json
import os
import signal
import time

import pytest
from conftest import CONFIGS, SMALL

from pytrain.monitor import AlertLog, StepMonitor, peak_tflops


def read_alerts(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def spikes_by_rule(losses, limit):
    """InternLM's rule: step t spikes when its loss exceeds limit x the previous finite loss."""
    out, previous = [], None
    for step, loss in enumerate(losses, start=1):
        if loss == loss and loss != float("inf"):
            if previous is not None and loss > limit * previous:
                out.append(step)
            previous = loss
    return out


def test_step_alerts(tmp_path):
    path = tmp_path / "alerts" / "job_alert.log"  # the folder is created
    log = AlertLog(path, "job", rank=0, loss_spike_limit=1.5)
    losses = [4.0, 3.0, 4.6, 4.5, float("nan"), 7.0, 6.0, 9.5]
    skipped = [False, False, False, False, True, False, False, False]
    for step, (loss, skip) in enumerate(zip(losses, skipped), start=1):
        log.step(step, loss, float("inf") if skip else 1.0, skip)
    log.finished(len(losses))
    alerts = read_alerts(path)
    assert [a["step"] for a in alerts if a["alert"] == "loss_spike"] == spikes_by_rule(losses, 1.5) == [3, 6, 8]
    assert [(a["step"], a["grad_norm"]) for a in alerts if a["alert"] == "skipped_step"] == [(5, "inf")]
    assert alerts[-1]["alert"] == "run_finished" and alerts[-1]["step"] == 8
    assert all(a["job"] == "job" and a["rank"] == 0 and a["time"] and a["host"] for a in alerts)
    spike = next(a for a in alerts if a["alert"] == "loss_spike")
    assert (spike["loss"], spike["previous_loss"]) == (4.6, 3.0)


def test_a_failure_is_written_and_propagates(tmp_path):
    log = AlertLog(tmp_path / "a.log", "job", rank=3)
    with pytest.raises(ZeroDivisionError), log.watch(lambda: 17):
        1 / 0  # noqa: B018
    (alert,) = read_alerts(tmp_path / "a.log")
    assert alert["alert"] == "run_failed" and alert["step"] == 17 and alert["rank"] == 3
    assert alert["error"] == "ZeroDivisionError: division by zero" and "1 / 0" in alert["traceback"]


@pytest.fixture
def default_sigterm():
    before = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    yield
    signal.signal(signal.SIGTERM, before)


def test_an_uncaught_sigterm_is_a_failure_too(tmp_path, default_sigterm):
    log = AlertLog(tmp_path / "a.log", "job")
    with pytest.raises(SystemExit) as stopped, log.watch(lambda: 2):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1)  # the handler raises before this ends
    assert stopped.value.code == 128 + signal.SIGTERM
    assert read_alerts(tmp_path / "a.log")[0]["error"].startswith("SystemExit")
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # restored


def test_an_installed_sigterm_handler_stays_in_charge(tmp_path, default_sigterm):
    """pytrain.checkpoint's StopSignal records SIGTERM to stop gracefully: watch() must not take it over."""
    received = []
    signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
    log = AlertLog(tmp_path / "a.log", "job")
    with log.watch(lambda: 2):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.1)
    assert received == [signal.SIGTERM] and not (tmp_path / "a.log").exists()


def test_configured_peak_wins():
    import torch

    assert peak_tflops(torch.device("cpu"), torch.float32, 123.0) == (123.0, "monitor.peak_tflops")


def test_tensorboard_queue_length(tmp_path):
    import torch

    monitor = StepMonitor(tmp_path, 1, 1, 1.0, 1.0, torch.device("cpu"), tensorboard=True, tensorboard_queue=3)
    assert monitor._writer.max_queue == 3
    monitor.close()


def test_run_writes_alerts_uses_the_configured_peak_and_lists_ignored_fields(fresh_context, tmp_path, capsys):
    """fp16 with a loss scale no gradient survives: every step overflows and is skipped."""
    from pytrain.parallel import gpc
    from pytrain.train.__main__ import main

    alert_file = tmp_path / "llm_alter" / "tiny_alert.log"
    argv = [
        "--config",
        str(CONFIGS / "tiny.py"),
        "--set",
        *SMALL,
        "data.total_steps=3",
        f"monitor.run_folder={tmp_path}",
    ]
    argv += [
        "model.dtype=torch.float16",
        "grad_scaler.fp16.initial_scale=1e38",
        "grad_scaler.max_scale=1e38",
        "grad_scaler.hysteresis=100",
        f"monitor.alert.alert_file_path={alert_file}",
        "monitor.peak_tflops=50.0",
        "data.diag_outlier_ratio=1.1",
        "model.init_type=normal",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "peak 50.00 TFLOPS per rank (monitor.peak_tflops)" in out
    assert "; ignored here: model.init_type, data.diag_outlier_ratio" in out
    alerts = read_alerts(alert_file)
    assert [a["alert"] for a in alerts] == ["skipped_step"] * 3 + ["run_finished"]
    rows = [json.loads(line) for line in (gpc.run_folder / "metrics.jsonl").read_text().splitlines()]
    assert all(r["skipped"] for r in rows) and rows[0]["mfu"] == pytest.approx(rows[0]["tflops"] / 50.0)
