"""The scalar conversions every CPU kernel uses (csrc/cpu/cpu_types.h: to_float / from_float), through
pytrain._C.convert: exact against PyTorch's own conversions, for every fp16 and bf16 value, every tie and the
values beside it, the overflow and underflow edges, and a million random fp32 bit patterns. NaN only has to
stay NaN (its payload is implementation-defined)."""

import pytest
import torch

from pytrain.kernels import _backend
from pytrain.kernels._backend import DTYPE_CODES

pytestmark = pytest.mark.skipif(_backend.extension(torch.device("cpu")) is None, reason="pytrain._C not built")


def convert(src: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    src = src.contiguous()
    out = torch.empty(src.shape, dtype=dtype)
    _backend.extension(src.device).convert(
        src=src.data_ptr(),
        src_dtype=DTYPE_CODES[src.dtype],
        dst=out.data_ptr(),
        dst_dtype=DTYPE_CODES[dtype],
        n=src.numel(),
    )
    return out


def every_value(dtype: torch.dtype) -> torch.Tensor:
    return torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)


def assert_same_values(got: torch.Tensor, want: torch.Tensor):
    """Bit for bit where want is not NaN (so -0.0 keeps its sign), NaN where want is NaN."""
    nan = want.isnan()
    assert torch.equal(got.isnan(), nan), f"NaN at {(got.isnan() != nan).nonzero()[:5].flatten().tolist()}"
    bits = {2: torch.int16, 4: torch.int32}[want.element_size()]
    g, w = got[~nan].view(bits), want[~nan].view(bits)
    bad = (g != w).nonzero().flatten()
    assert bad.numel() == 0, (
        f"{bad.numel()} differ, e.g. {got[~nan][bad[:5]].tolist()} != {want[~nan][bad[:5]].tolist()}"
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_every_16_bit_value_widens_exactly_and_round_trips(dtype):
    values = every_value(dtype)
    wide = convert(values, torch.float32)
    assert_same_values(wide, values.float())
    assert_same_values(convert(wide, dtype), values)
    assert_same_values(convert(values, dtype), values)


def midpoints(dtype: torch.dtype) -> torch.Tensor:
    """Each value halfway between two neighbouring finite non-negative values of dtype (exact in fp32), and the
    fp32 numbers just below and above it."""
    finite = every_value(dtype)
    finite = finite[finite.isfinite() & ~torch.signbit(finite)].double().sort().values
    mid = ((finite[:-1] + finite[1:]) / 2).float()
    below = torch.nextafter(mid, torch.zeros_like(mid))
    above = torch.nextafter(mid, torch.full_like(mid, float("inf")))
    both_signs = torch.cat([mid, below, above])
    return torch.cat([both_signs, -both_signs])


EDGES = [
    0.0,
    -0.0,
    65504.0,
    65519.996,
    65520.0,
    65536.0,
    1e38,
    float("inf"),
    -float("inf"),
    float("nan"),
    2.0**-14,
    2.0**-24,
    2.0**-25,
    2.0**-25 * 1.0000001,
    2.0**-26,
    1e-40,
    -1e-45,
    3.0 * 2.0**-25,
    2.0**-14 - 2.0**-25,
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_narrowing_rounds_to_nearest_even(dtype):
    g = torch.Generator().manual_seed(0)
    random_bits = torch.randint(-(2**31), 2**31, (1 << 20,), generator=g, dtype=torch.int64).to(torch.int32)
    values = torch.cat([midpoints(dtype), torch.tensor(EDGES, dtype=torch.float32), random_bits.view(torch.float32)])
    assert_same_values(convert(values, dtype), values.to(dtype))


def test_between_16_bit_dtypes():
    """bf16 -> fp16 and back go through fp32, rounding once each way, as PyTorch's .to does."""
    for src, dst in ((torch.bfloat16, torch.float16), (torch.float16, torch.bfloat16)):
        values = every_value(src)
        assert_same_values(convert(values, dst), values.to(dst))


def test_bad_dtype_code_is_refused():
    with pytest.raises(ValueError, match="convert: unsupported dtype code 7"):
        _backend.extension(torch.device("cpu")).convert(src=0, src_dtype=7, dst=0, dst_dtype=0, n=0)
