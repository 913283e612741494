"""Rotary frequencies for long context: how each scaling type turns (head_dim, base) into the angle per position of
each rotated pair, as transformers' ROPE_INIT_FUNCTIONS computes them (modeling_rope_utils) for the same config.

    scaling = RopeScaling("llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=8192)
    q, k = apply_rotary(q, k, positions, base=5e5, scaling=scaling)

- "normal": inv_freq_i = base ** (-2i / head_dim) (transformers' "default").
- "linear" (position interpolation): inv_freq / factor, i.e. every position divided by factor.
- "dynamic" (NTK-aware): while the longest sequence L of the call is within max_position_embeddings, normal; past
  it, the base grows to base * (factor * L / max_position_embeddings - (factor - 1)) ** (head_dim / (head_dim - 2)).
  L is the largest position + 1 the call sees (a packed micro-batch's longest document), as transformers computes
  it from position_ids in each forward, and as InternEvo's DynamicNTKScalingRotaryEmbedding does in training.
- "llama3" (Llama 3.1): pairs whose wavelength 2 pi / inv_freq exceeds original_max_position_embeddings /
  low_freq_factor are divided by factor, those below original_max_position_embeddings / high_freq_factor are
  kept, and those between blend the two linearly in original_max_position_embeddings / wavelength.

Frequencies are float64 (transformers computes them in fp32: the two agree to fp32 rounding), so the cos/sin
tables built from them keep their precision at large positions.
"""

import math
from dataclasses import dataclass

import torch

ROPE_TYPES = ("normal", "linear", "dynamic", "llama3")


@dataclass(frozen=True)
class RopeScaling:
    """A rotary scaling (the module docstring). Only the fields of its type act; the others stay at their
    defaults, so two scalings that compute the same frequencies compare equal."""

    rope_type: str = "normal"
    factor: float = 1.0  # linear, dynamic, llama3
    max_position_embeddings: int = 2048  # dynamic: the length past which the base grows
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    original_max_position_embeddings: int = 8192  # llama3: the context the model was pre-trained on

    def __post_init__(self):
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"rope_type must be one of {', '.join(map(repr, ROPE_TYPES))}, got {self.rope_type!r}")
        _check_positive("factor", self.factor)
        _check_positive("low_freq_factor", self.low_freq_factor)
        _check_positive("high_freq_factor", self.high_freq_factor)
        for name in ("max_position_embeddings", "original_max_position_embeddings"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.rope_type == "llama3" and self.high_freq_factor <= self.low_freq_factor:
            raise ValueError(
                f"high_freq_factor ({self.high_freq_factor}) must be greater than low_freq_factor "
                f"({self.low_freq_factor}), e.g. Llama 3.1's 4.0 and 1.0"
            )

    def length_key(self, seq_len: int) -> int | None:
        """The sequence length the frequencies depend on (None: they do not; dynamic within its length)."""
        if self.rope_type == "dynamic" and seq_len > self.max_position_embeddings:
            return seq_len
        return None

    def inv_freq(self, head_dim: int, base: float, seq_len: int = 1, device=None) -> torch.Tensor:
        """float64 (head_dim // 2,): the angle per position of each rotated pair. seq_len: the call's largest
        position + 1 (read by "dynamic" only)."""
        exponents = torch.arange(0, head_dim, 2, device=device, dtype=torch.float64) / head_dim
        length = self.length_key(seq_len)
        if length is not None:
            if head_dim <= 2:
                raise ValueError(f"dynamic NTK scaling needs head_dim > 2, got {head_dim}")
            stretch = self.factor * length / self.max_position_embeddings - (self.factor - 1)
            base = base * stretch ** (head_dim / (head_dim - 2))
        inv_freq = base**-exponents
        if self.rope_type == "linear":
            return inv_freq / self.factor
        if self.rope_type == "llama3":
            return self._llama3(inv_freq)
        return inv_freq

    def _llama3(self, inv_freq: torch.Tensor) -> torch.Tensor:
        context = self.original_max_position_embeddings
        wavelength = 2 * math.pi / inv_freq
        scaled = torch.where(wavelength > context / self.low_freq_factor, inv_freq / self.factor, inv_freq)
        smooth = (context / wavelength - self.low_freq_factor) / (self.high_freq_factor - self.low_freq_factor)
        blended = (1 - smooth) * scaled / self.factor + smooth * scaled
        between = (wavelength >= context / self.high_freq_factor) & (wavelength <= context / self.low_freq_factor)
        return torch.where(between, blended, scaled)

    def op_args(self) -> tuple[str, list[float]]:
        """The scaling as torch.library custom-op arguments (a type and its numbers); from_op_args inverts it."""
        numbers = (
            self.factor,
            self.max_position_embeddings,
            self.low_freq_factor,
            self.high_freq_factor,
            self.original_max_position_embeddings,
        )
        return self.rope_type, [float(n) for n in numbers]

    @classmethod
    def from_op_args(cls, rope_type: str, numbers: list[float]) -> "RopeScaling":
        factor, max_positions, low, high, original = numbers
        return cls(rope_type, factor, int(max_positions), low, high, int(original))


def _check_positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")


NO_SCALING = RopeScaling()
