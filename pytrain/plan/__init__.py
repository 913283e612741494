"""The layout planner: which layouts of a world size the run accepts, and what each costs per rank in memory,
communication and time, before anything is launched (pytrain.plan.planner); and what its memory predictions
are checked against on the CPU (pytrain.plan.measure)."""

from .layouts import Layout, PlanError, valid_layouts, validate
from .measure import AllocatorPeak
from .memory import MemoryEstimate, Recompute, Schedule, layout_memory, rank_memory
from .planner import Plan, PlannedLayout, Target, parse_bytes, plan, write_json
from .shape import ModelShape
from .step_time import StepEstimate, step_estimate

__all__ = [
    "AllocatorPeak",
    "Layout",
    "MemoryEstimate",
    "ModelShape",
    "Plan",
    "PlanError",
    "PlannedLayout",
    "Recompute",
    "Schedule",
    "StepEstimate",
    "Target",
    "layout_memory",
    "parse_bytes",
    "plan",
    "rank_memory",
    "step_estimate",
    "valid_layouts",
    "validate",
    "write_json",
]
