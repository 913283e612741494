"""Process groups and the global parallel context."""

from .context import Layout, ParallelContext, gpc

__all__ = ["Layout", "ParallelContext", "gpc"]
