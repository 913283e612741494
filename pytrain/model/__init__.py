"""Model definitions: the plain decoder, its mixture-of-experts MLP and the families' specs (pytrain.specs
registers them in MODEL_INITIALIZER with their checkpoint adapters)."""

from pytrain.model_args import mlp_width

from . import families, moe
from .decoder import DTYPES, Decoder, LayerNorm
from .loss import LMLoss, TypeLosses
from .moe import MoE, MoELayer

__all__ = ["DTYPES", "Decoder", "LMLoss", "LayerNorm", "MoE", "MoELayer", "TypeLosses", "families", "mlp_width", "moe"]
