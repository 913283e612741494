"""Model definitions; importing this package registers the families in MODEL_INITIALIZER."""

from pytrain.config import mlp_width

from . import families, moe
from .decoder import DTYPES, Decoder, LayerNorm
from .loss import LMLoss
from .moe import MoE, MoELayer

__all__ = ["DTYPES", "Decoder", "LMLoss", "LayerNorm", "MoE", "MoELayer", "families", "mlp_width", "moe"]
