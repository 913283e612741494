"""Process groups and the global parallel context."""
from .context import ParallelContext, gpc

__all__ = ["ParallelContext", "gpc"]
