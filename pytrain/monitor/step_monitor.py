"""The per-step log line, metrics.jsonl, TensorBoard scalars, the loss-curve plot and the alerts of a run.

Only the first rank prints and writes (alerts of a failure: every rank); every rank takes part in the loss
all-reduce. A mixture-of-experts run also reports `moe_loss` (the load-balancing loss: sum over layers, mean
over micro-batches, unweighted by loss.moe_loss_coeff), summed over the pipeline stages, which hold
different layers, then averaged over data-parallel ranks as the loss is.

MFU never exceeds 100%: a step faster than the peak shows the peak was too low (a matmul measured at
start-up while the machine was busy, or a wrong monitor.peak_tflops); the peak is raised to what the step
achieved, and the first rank says so once.
"""

import contextlib
import json
import resource
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from .alerts import AlertLog
from .loss_plot import write_loss_svg


def peak_memory_mib(device: torch.device) -> float:
    """Peak CUDA memory allocated by torch, or on the CPU the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class StepMonitor:
    def __init__(
        self,
        run_folder: Path,
        total_steps: int,
        tokens_per_step_per_rank: int,
        flops_per_token: float,
        peak_tflops: float,
        device: torch.device,
        log_every: int = 1,
        tensorboard: bool = True,
        is_main_rank: bool = True,
        group=None,
        stream=None,
        alerts: AlertLog | None = None,
        tensorboard_queue: int = 10,
        pipeline_group=None,
        peak_source: str = "given",
        dataset_types: list[str] | None = None,
    ):
        self.run_folder, self.total_steps = Path(run_folder), total_steps
        self.tokens = tokens_per_step_per_rank
        self.flops_per_token, self.peak_tflops, self.peak_source = flops_per_token, peak_tflops, peak_source
        self.device, self.log_every, self.group, self.stream = device, log_every, group, stream
        self.pipeline_group = pipeline_group
        self.is_main_rank, self.alerts = is_main_rank, alerts
        self.dataset_types = dataset_types or []
        self.last_step = 0
        self.steps: list[int] = []
        self.losses: list[float] = []
        self._metrics_file = open(self.run_folder / "metrics.jsonl", "a") if is_main_rank else None  # noqa: SIM115 (closed by close())
        self._writer = None
        if tensorboard and is_main_rank:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.run_folder / "tensorboard"), max_queue=tensorboard_queue)
        self._last = time.perf_counter()

    def start_step(self) -> None:
        """Restarts the step clock (before the first step; end_step restarts it after each)."""
        self._last = time.perf_counter()

    def end_step(
        self,
        step: int,
        loss: torch.Tensor,
        grad_norm: float,
        lr: float,
        success: bool,
        loss_scale: float | None = None,
        moe_loss: torch.Tensor | None = None,
        type_stats: torch.Tensor | None = None,
    ) -> dict:
        """moe_loss: this rank's MoE aux loss (Trainer.moe_loss()); type_stats: its per-type tokens, loss sums
        and label counts (Trainer.type_stats()), reported as tokens/<type> and loss/<type> over the global
        batch. Every rank passes one or none does."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - self._last
        loss = loss.detach().float().clone()
        if dist.is_initialized() and dist.get_world_size(self.group) > 1:
            dist.all_reduce(loss, group=self.group)
            loss /= dist.get_world_size(self.group)
        if moe_loss is not None:
            moe_loss = moe_loss.detach().float().clone()
            if (
                dist.is_initialized()
                and self.pipeline_group is not None
                and dist.get_world_size(self.pipeline_group) > 1
            ):
                dist.all_reduce(moe_loss, group=self.pipeline_group)  # each stage holds its own layers
            if dist.is_initialized() and dist.get_world_size(self.group) > 1:
                dist.all_reduce(moe_loss, group=self.group)
                moe_loss /= dist.get_world_size(self.group)
        tgs = self.tokens / seconds
        tflops = tgs * self.flops_per_token / 1e12
        if tflops > self.peak_tflops:
            self._raise_peak(step, tflops)
        metrics = {
            "step": step,
            "loss": loss.item(),
            "lr": lr,
            "grad_norm": grad_norm,
            "tgs": tgs,
            "tflops": tflops,
            "mfu": tflops / self.peak_tflops,
            "memory_mib": peak_memory_mib(self.device),
            "step_time": seconds,
            "skipped": not success,
        }
        if loss_scale is not None:
            metrics["loss_scale"] = loss_scale
        if moe_loss is not None:
            metrics["moe_loss"] = moe_loss.item()
        if type_stats is not None:
            metrics.update(self._per_type(type_stats))
        self.last_step = step
        if self.is_main_rank:
            self._record(metrics)
            if self.alerts:
                self.alerts.step(step, metrics["loss"], grad_norm, not success)
        self._last = time.perf_counter()  # the next step's time includes its data loading
        return metrics

    def _per_type(self, stats: torch.Tensor) -> dict:
        """tokens/<type> of the global batch, and loss/<type> (its labelled tokens' mean) where it had any."""
        stats = stats.detach().float().clone()
        if dist.is_initialized() and self.pipeline_group is not None and dist.get_world_size(self.pipeline_group) > 1:
            dist.all_reduce(stats[1:], group=self.pipeline_group)  # the losses live on the last stage
        if dist.is_initialized() and dist.get_world_size(self.group) > 1:
            dist.all_reduce(stats, group=self.group)
        tokens, sums, counts = stats.tolist()
        out = {f"tokens/{name}": int(n) for name, n in zip(self.dataset_types, tokens)}
        out.update({f"loss/{name}": s / c for name, s, c in zip(self.dataset_types, sums, counts) if c > 0})
        return out

    def _raise_peak(self, step: int, tflops: float) -> None:
        if self.is_main_rank and self.peak_source != "raised":
            print(
                f"pytrain: step {step} ran at {tflops:.3f} TFLOPS per rank, above the peak of {self.peak_tflops:.3f} "
                f"({self.peak_source}; a measurement taken while the machine was busy?): MFU is now relative to the "
                "best step seen, so it stays at most 100%; set monitor.peak_tflops to the device's peak to fix it",
                file=self.stream or sys.stdout,
                flush=True,
            )
        self.peak_tflops, self.peak_source = tflops, "raised"

    def _record(self, m: dict) -> None:
        self.steps.append(m["step"])
        self.losses.append(m["loss"])
        self._metrics_file.write(json.dumps(m) + "\n")
        self._metrics_file.flush()
        if self._writer:
            for key in ("loss", "moe_loss", "lr", "grad_norm", "tgs", "tflops", "mfu", "memory_mib", "loss_scale"):
                if key in m:
                    self._writer.add_scalar(f"train/{key}", m[key], m["step"])
            for key, value in m.items():
                if key.startswith(("tokens/", "loss/")):  # InternEvo's names of the per-type scalars
                    self._writer.add_scalar(key, value, m["step"])
        if m["step"] % self.log_every == 0 or m["step"] == self.total_steps:
            line = (
                f"step {m['step']}/{self.total_steps} | loss {m['loss']:.4f} | "
                + (f"moe_loss {m['moe_loss']:.4f} | " if "moe_loss" in m else "")
                + f"lr {m['lr']:.3e} | "
                f"grad_norm {m['grad_norm']:.3f} | tgs {m['tgs']:,.0f} | tflops {m['tflops']:.3f} | "
                f"mfu {100 * m['mfu']:.1f}% | mem {m['memory_mib']:,.0f} MiB | {m['step_time'] * 1000:.0f} ms"
            )
            if "loss_scale" in m:
                line += f" | loss_scale {m['loss_scale']:g}"
            if m["skipped"]:
                line += " | step skipped (inf/NaN gradients)"
            print(line, file=self.stream or sys.stdout, flush=True)

    def record_validation(self, step: int, metrics: dict[str, float]) -> None:
        """A validation pass's metrics (pytrain.train.validation): a line, metrics.jsonl and TensorBoard."""
        if not self.is_main_rank:
            return
        self._metrics_file.write(json.dumps({"step": step, **metrics}) + "\n")
        self._metrics_file.flush()
        if self._writer:
            for key, value in metrics.items():
                self._writer.add_scalar(key, value, step)
        sets = " | ".join(f"{key.removeprefix('val/')} {value:.4f}" for key, value in metrics.items())
        print(f"validation at step {step} | {sets}", file=self.stream or sys.stdout, flush=True)

    def watch(self):
        """A context around the training loop: with an alert log, a failure (SIGTERM too) on any rank writes
        run_failed before it propagates."""
        return self.alerts.watch(lambda: self.last_step) if self.alerts else contextlib.nullcontext()

    def close(self) -> None:
        if not self.is_main_rank:
            return
        if self.alerts:
            self.alerts.finished(self.last_step)
        write_loss_svg(self.run_folder / "loss.svg", self.steps, self.losses)
        self._metrics_file.close()
        if self._writer:
            self._writer.close()
