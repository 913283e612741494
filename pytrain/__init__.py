"""pytrain: a performance-first trainer for decoder-only language models.

Kernels alone: ``import pytrain.kernels``. Training: ``python -m pytrain.train --config configs/tiny.py``.
"""

__version__ = "0.1.0"
