"""Model definitions; importing this package registers the families in MODEL_INITIALIZER."""

from pytrain.config import mlp_width

from . import families
from .decoder import DTYPES, Decoder, LayerNorm
from .loss import LMLoss

__all__ = ["DTYPES", "Decoder", "LMLoss", "LayerNorm", "families", "mlp_width"]
