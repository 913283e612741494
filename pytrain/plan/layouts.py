"""The layouts of a world size: every combination of the parallel fields, kept only where the run's own
validation accepts it.

A candidate is a set of config overrides (`Layout.overrides()`, the `--set` syntax) applied to the config, which
then goes through exactly what a launch does before any process waits on another: Config.from_dict's validation
(pytrain.config: the model split over tensor and pipeline, the schedule's micro-batch rules, fsdp's availability)
and ParallelDims.from_config (the world size, zero1, expert and expert_zero1 sizes). A layout the planner lists
is one `torchrun --nproc_per_node=<world> -m pytrain.train --config X --set <its overrides>` accepts.

Varied: tensor size (every divisor of the world) and mode (mtp, msp, isp with each weight-parallel size that
divides data x tensor, and isp's sequence_2D with a single ring of each size dividing the tensor size: the heads
over the rest), pipeline size and interleaved chunks
(1, 2, 4), ZeRO-1 size (every divisor of the data-parallel size), FSDP over the zero1 group (with and without
reshard_after_forward where the config knows that field), expert size (a mixture of experts: every divisor of
the data-parallel size), recompute (none, whole layers, selective 'attention' / 'matmuls', and the config's own
choice). Every other field keeps the config's value.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from pytrain.config import SCHEMA, Config, ConfigError
from pytrain.parallel.mesh import ParallelDims

from .memory import Recompute

CHUNKS = (1, 2, 4)
RECOMPUTE_CHOICES = (Recompute(), Recompute(1.0), Recompute(0.0, "attention"), Recompute(0.0, "matmuls"))


class PlanError(ConfigError):
    """A planner call that cannot be answered: the message names the fields and what would work."""


@dataclass(frozen=True)
class Layout:
    tensor: int
    mode: str
    pipeline: int
    chunks: int
    zero1: int
    fsdp: bool
    reshard_after_forward: bool | None  # None: the config has no such field (FSDP's default)
    expert: int | None  # None: a dense model
    recompute: Recompute
    weight: int = 1  # isp's weight parallelism
    context: int = 1  # isp's sequence_2D: the ranks of the attention ring (the tensor ranks / context: head ranks)

    def overrides(self) -> list[str]:
        """The `--set` overrides that make a config this layout."""
        out = [
            f"parallel.tensor.size={self.tensor}",
            f"parallel.tensor.mode={self.mode!r}",
            f"parallel.pipeline.size={self.pipeline}",
            f"model.num_chunks={self.chunks}",
            f"parallel.zero1.size={self.zero1}",
            f"parallel.zero1.fsdp={self.fsdp}",
            f"model.checkpoint={self.recompute.fraction:g}",
            f"selective_checkpoint={self.recompute.selective is not None}",
        ]
        if self.reshard_after_forward is not None:
            out.append(f"parallel.zero1.reshard_after_forward={self.reshard_after_forward}")
        if self.recompute.selective is not None:
            out.append(f"selective_checkpoint_policy={self.recompute.selective!r}")
        if self.expert is not None:
            out.append(f"parallel.expert.size={self.expert}")
        if self.weight > 1:
            out.append(f"parallel.weight.size={self.weight}")
        out.append(f"parallel.sequence_2D.enable={self.context > 1}")
        if self.context > 1:
            out += [
                f"parallel.sequence_2D.head_size={self.tensor // self.context}",
                f"parallel.sequence_2D.context_size={self.context}",
                "parallel.sequence_2D.window_size=1",
            ]
        return out

    def describe(self, dims: ParallelDims) -> str:
        """e.g. 'dp8 zero1 8 tp2 msp pp2x2 ep2 recompute full'."""
        sharding = f"fsdp {self.zero1}" if self.fsdp else f"zero1 {self.zero1}"
        parts = [f"dp{dims.data}", f"weight {self.weight}" if self.weight > 1 else sharding]
        if self.fsdp and self.reshard_after_forward is False:
            parts.append("no-reshard")
        if self.context > 1:
            parts.append(f"tp{self.tensor} isp 2D head {self.tensor // self.context} x ring {self.context}")
        elif self.tensor > 1:
            parts.append(f"tp{self.tensor} {self.mode}")
        if self.pipeline > 1:
            parts.append(f"pp{self.pipeline}" + (f"x{self.chunks}" if self.chunks > 1 else ""))
        if dims.expert > 1:
            parts.append(f"ep{dims.expert}")
        parts.append(f"recompute {self.recompute.name}")
        return " ".join(parts)


@dataclass(frozen=True)
class ValidLayout:
    layout: Layout
    config: Config  # the config with the layout's overrides, validated
    dims: ParallelDims


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _fsdp_choices() -> list[tuple[bool, bool | None]]:
    """(fsdp, reshard_after_forward) pairs: ZeRO-1, and FSDP with each reshard setting the config has a field for.
    Whether FSDP is accepted at all is the config validation's call, made per layout."""
    zero1 = SCHEMA["parallel"]["zero1"]
    reshard = [True, False] if "reshard_after_forward" in zero1 else [None]
    return [(False, None)] + [(True, r) for r in reshard]


def candidates(cfg: Config, world_size: int):
    """Every layout to try for `world_size` ranks (module docstring); validity is decided by validate()."""
    experts = cfg.model.get("num_experts", 1) > 1
    own = Recompute(
        float(cfg.model.get("checkpoint", False)),
        cfg.selective_checkpoint_policy if cfg.selective_checkpoint else None,
    )
    recomputes = list(RECOMPUTE_CHOICES) + ([own] if own not in RECOMPUTE_CHOICES else [])
    for tensor in divisors(world_size):
        for pipeline in divisors(world_size // tensor):
            data = world_size // (tensor * pipeline)
            modes = ("mtp", "msp", "isp") if tensor > 1 else ("mtp",)
            chunk_choices = CHUNKS if pipeline > 1 else (1,)
            expert_choices = divisors(data) if experts else [None]
            for mode, chunks, zero1, (fsdp, reshard), expert, recompute in itertools.product(
                modes, chunk_choices, divisors(data), _fsdp_choices(), expert_choices, recomputes
            ):
                if fsdp and zero1 == 1:
                    continue  # FSDP over one rank is no sharding: the ZeRO-1 layout of size 1
                contexts = divisors(tensor) if mode == "isp" else [1]  # sequence_2D: a ring of each size
                for context in contexts:
                    yield Layout(tensor, mode, pipeline, chunks, zero1, fsdp, reshard, expert, recompute, 1, context)
                    if mode == "isp" and not fsdp and zero1 == 1:  # weight parallelism shards the optimizer state
                        for weight in divisors(data * tensor)[1:]:
                            yield Layout(
                                tensor, mode, pipeline, chunks, 1, False, reshard, expert, recompute, weight, context
                            )


def validate(cfg: Config, layout: Layout, world_size: int, source: str = "config") -> ValidLayout:
    """The run's validation of `cfg` with the layout's overrides on `world_size` ranks; a ConfigError (or the
    ValueError of ParallelDims) when the run would refuse it."""
    laid_out = Config.from_dict(dict(cfg), source=source, overrides=layout.overrides())
    return ValidLayout(layout, laid_out, ParallelDims.from_config(laid_out, world_size, source))


def valid_layouts(cfg: Config, world_size: int, source: str = "config") -> list[ValidLayout]:
    """Every candidate the run accepts on `world_size` ranks; a PlanError naming why none was, and the world sizes
    near it that admit one, when there is none."""
    if world_size < 1:
        raise PlanError(f"--world_size {world_size}: the planner needs at least one rank")
    valid, refusals = [], {}
    for layout in candidates(cfg, world_size):
        try:
            valid.append(validate(cfg, layout, world_size, source))
        except (ConfigError, ValueError) as err:
            refusals.setdefault(str(err).removeprefix(f"{source}: "), None)
    if valid:
        return valid
    reasons = list(refusals)
    shown = "; ".join(reasons[:4]) + (f"; and {len(reasons) - 4} more" if len(reasons) > 4 else "")
    working = [w for w in range(1, 2 * world_size + 9) if w != world_size and _admits_a_layout(cfg, w, source)][:6]
    suggestion = (
        f"world sizes that admit one with this config: {', '.join(map(str, working))}"
        if working
        else "no world size up to twice this one admits one: change the fields named above"
    )
    raise PlanError(
        f"{source}: no layout of {world_size} ranks passes the run's validation (every combination of tensor, "
        f"pipeline, zero1, expert size and recompute was tried): {shown}. {suggestion}"
    )


def _admits_a_layout(cfg: Config, world_size: int, source: str) -> bool:
    for layout in candidates(cfg, world_size):
        if layout.recompute != RECOMPUTE_CHOICES[0]:
            continue  # no recompute is valid wherever another choice is
        try:
            validate(cfg, layout, world_size, source)
            return True
        except (ConfigError, ValueError):
            continue
    return False
