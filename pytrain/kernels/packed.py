"""The sequence boundaries of one packed micro-batch, checked once and shared by every layer.

    packed = PackedSequences(cu_seqlens, device="cuda")    # once per micro-batch, from the host's boundaries
    q, k = apply_rotary(q, k, packed)                      # each layer: positions and table size from `packed`
    out = flash_attn_varlen_func(q, k, v, packed, causal=True)

With a cu_seqlens tensor instead, every call checks the boundaries itself, which reads them back to the host
(on a GPU: a synchronization per layer, forward and backward). Built from a list or a CPU tensor, this object
makes no synchronization at all: one pinned copy moves cu_seqlens and the positions to the device.
"""

import itertools

import torch


class PackedSequences:
    """cu_seqlens (num_seqs + 1,): where each sequence of the packed tokens starts, from 0 up to the token count.

    Attributes: cu_seqlens (int32, on `device`), positions (int64 (tokens,) on `device`: each token's position in
    its sequence, restarting at 0), bounds (tuple of ints on the host), max_seqlen (int), total_tokens (int).
    """

    def __init__(self, cu_seqlens, device=None):
        if isinstance(cu_seqlens, torch.Tensor):
            if cu_seqlens.dtype not in (torch.int32, torch.int64) or cu_seqlens.dim() != 1:
                raise TypeError(
                    f"cu_seqlens must be a 1-D int32 or int64 tensor, got {cu_seqlens.dtype} {tuple(cu_seqlens.shape)}"
                )
            device = cu_seqlens.device if device is None else device
            bounds = tuple(cu_seqlens.tolist())  # a device tensor: the one synchronization, here once
        elif isinstance(cu_seqlens, (list, tuple)) and all(
            isinstance(b, int) and not isinstance(b, bool) for b in cu_seqlens
        ):
            bounds = tuple(cu_seqlens)
        else:
            raise TypeError(f"cu_seqlens must be a list of ints or an int tensor, got {type(cu_seqlens).__name__}")
        if len(bounds) < 2 or bounds[0] != 0:
            raise ValueError(f"cu_seqlens must start at 0 and have at least 2 entries, got {list(bounds)[:4]}...")
        lengths = [b - a for a, b in itertools.pairwise(bounds)]
        if min(lengths) < 0:
            raise ValueError("cu_seqlens must be non-decreasing")
        if bounds[-1] >= 2**31:
            raise ValueError(f"cu_seqlens ends at {bounds[-1]} tokens; the kernels take at most 2**31 - 1")
        self.bounds, self.max_seqlen, self.total_tokens = bounds, max(lengths), bounds[-1]
        device = torch.device("cpu" if device is None else device)
        host_bounds = torch.tensor(bounds, dtype=torch.int64, device="cpu")
        starts = torch.repeat_interleave(host_bounds[:-1], torch.tensor(lengths, device="cpu"), output_size=bounds[-1])
        positions = torch.arange(bounds[-1], dtype=torch.int64, device="cpu") - starts
        both = torch.cat((host_bounds, positions))
        if device.type == "cuda":
            both = both.pin_memory().to(device, non_blocking=True)
        else:
            both = both.to(device)
        self.cu_seqlens = both[: len(bounds)].to(torch.int32)
        self.positions = both[len(bounds) :]
        self.device = both.device  # "cuda" resolved to its index, as tensors report it

    def check_tokens(self, name: str, tensor: torch.Tensor, tokens: int) -> None:
        """Host-only checks of a tensor laid over these sequences: device and token count."""
        if tensor.device != self.device:
            raise ValueError(f"{name} is on {tensor.device}, the PackedSequences on {self.device}")
        if tokens != self.total_tokens:
            raise ValueError(f"{name} holds {tokens} tokens, the PackedSequences {self.total_tokens}")

    def __repr__(self) -> str:
        return (
            f"PackedSequences({len(self.bounds) - 1} sequences, {self.total_tokens} tokens, "
            f"max_seqlen={self.max_seqlen}, device={self.device})"
        )
