"""The planner: every valid layout of a world size, each with its predicted memory per rank, communication and
step time, ranked (those that fit the device first, then the fastest), as a table and as JSON.

    python -m pytrain.train --config configs/7B.py --plan --world_size 64 --device_memory 80GiB \\
        [--peak_tflops 989] [--link_gbps 50] [--plan_json plan.json]

    from pytrain.plan import plan
    result = plan(cfg, world_size=64, device_memory=80 * 2**30, peak_tflops=989, link_gbps=50)
    result.layouts[0].layout.overrides()   # the --set overrides of the best layout
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass

from pytrain.config import Config

from .layouts import Layout, ValidLayout, valid_layouts
from .memory import MemoryEstimate, Schedule, layout_memory
from .shape import ModelShape
from .step_time import StepEstimate, step_estimate

GiB = 2**30
UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30}
UNITS["tib"] = 2**40


def parse_bytes(text: str) -> int:
    """'80GiB', '80GB', '85899345920' -> bytes; a ValueError naming the accepted forms."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in UNITS or float(match.group(1)) <= 0:
        raise ValueError(f"--device_memory {text!r}: give a positive size such as 80GiB, 80GB or 141GiB")
    return int(float(match.group(1)) * UNITS[unit])


@dataclass(frozen=True)
class Target:
    """The devices planned for: memory per device (bytes), dense peak TFLOPS at the model's dtype, each rank's
    link in GB/s."""

    device_memory: int
    peak_tflops: float
    link_gbps: float


@dataclass(frozen=True)
class PlannedLayout:
    layout: Layout
    description: str
    world_size: int
    data: int
    expert: int
    expert_zero1: int
    memory: MemoryEstimate  # the worst rank's
    step: StepEstimate
    fits: bool

    def to_json(self) -> dict:
        return {
            "layout": self.description,
            "overrides": self.layout.overrides(),
            "fits": self.fits,
            "world_size": self.world_size,
            "data": self.data,
            "tensor": self.layout.tensor,
            "tensor_mode": self.layout.mode,
            "weight": self.layout.weight,
            "pipeline": self.layout.pipeline,
            "chunks": self.layout.chunks,
            "zero1": self.layout.zero1,
            "fsdp": self.layout.fsdp,
            "reshard_after_forward": self.layout.reshard_after_forward,
            "expert": self.expert,
            "expert_zero1": self.expert_zero1,
            "recompute": self.layout.recompute.name,
            "memory_bytes_per_rank": asdict(self.memory),
            "step": asdict(self.step),
        }


@dataclass(frozen=True)
class Plan:
    target: Target
    world_size: int
    layouts: list[PlannedLayout]  # ranked

    @property
    def fitting(self) -> list[PlannedLayout]:
        return [p for p in self.layouts if p.fits]

    def to_json(self) -> dict:
        return {
            "target": asdict(self.target),
            "world_size": self.world_size,
            "layouts": [p.to_json() for p in self.layouts],
        }

    def table(self, rows: int = 20) -> str:
        """The ranked layouts as a text table (the first `rows`)."""
        shown = self.layouts[:rows]
        width = max([len("layout"), *(len(p.description) for p in shown)])
        header = (
            f"{'#':>4}  {'fits':4}  {'layout':<{width}} {'params':>7} {'grads':>7} {'optim':>7} {'activ':>7} "
            f"{'x':>3} {'comm':>6} {'peak':>7}  {'step s':>8} {'tokens/s':>10} {'sent GB':>8}"
        )
        lines = [header, "-" * len(header)]
        for index, p in enumerate(shown, start=1):
            m, s = p.memory, p.step
            lines.append(
                f"{index:>4}  {'yes' if p.fits else 'no':4}  {p.description:<{width}} {m.parameters / GiB:>7.2f} "
                f"{m.gradients / GiB:>7.2f} {m.optimizer_state / GiB:>7.2f} {m.activations / GiB:>7.2f} "
                f"{m.in_flight:>3} {m.communication_buffers / GiB:>6.2f} {m.peak / GiB:>7.2f}  {s.step_s:>8.3f} "
                f"{s.tokens_per_s:>10,.0f} {sum(s.communication_bytes.values()) / 1e9:>8.2f}"
            )
        if len(self.layouts) > rows:
            lines.append(f"... {len(self.layouts) - rows} more layouts")
        return "\n".join(lines)


def plan(cfg: Config, world_size: int, target: Target, source: str = "config") -> Plan:
    """Every layout of `world_size` ranks the run accepts, predicted and ranked: fitting ones first, then by
    tokens per second (the step's tokens differ between layouts: micro_num x micro_bsz is per data-parallel
    rank), then by peak memory."""
    shape = ModelShape.from_config(cfg)
    planned = [_predict(shape, valid, target) for valid in valid_layouts(cfg, world_size, source)]
    planned.sort(key=lambda p: (not p.fits, -p.step.tokens_per_s, p.memory.peak))
    return Plan(target, world_size, planned)


def _predict(shape: ModelShape, valid: ValidLayout, target: Target) -> PlannedLayout:
    schedule = Schedule.from_config(valid.config, valid.dims)
    memory = layout_memory(shape, schedule)
    return PlannedLayout(
        layout=valid.layout,
        description=valid.layout.describe(valid.dims),
        world_size=valid.dims.world_size,
        data=valid.dims.data,
        expert=valid.dims.expert,
        expert_zero1=valid.dims.expert_zero1,
        memory=memory,
        step=step_estimate(shape, schedule, target.peak_tflops, target.link_gbps),
        fits=memory.peak <= target.device_memory,
    )


def write_json(result: Plan, path: str) -> None:
    with open(path, "w") as out:
        json.dump(result.to_json(), out, indent=1)
