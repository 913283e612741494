"""Model definitions; importing this package registers them in MODEL_INITIALIZER."""

from pytrain.config import mlp_width

from .internlm import DTYPES, InternLM, build_model_with_cfg, partition_layers
from .loss import LMLoss

__all__ = ["DTYPES", "InternLM", "LMLoss", "build_model_with_cfg", "mlp_width", "partition_layers"]
