"""The layout of a run (ParallelDims, ParallelMesh) and the global parallel context."""

from .context import ParallelContext, gpc
from .mesh import ParallelDims, ParallelMesh

__all__ = ["ParallelContext", "ParallelDims", "ParallelMesh", "gpc"]
