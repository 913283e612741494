"""Every random generator a rank uses, as JSON (byte states in base64), so resuming continues the same
streams: torch CPU, the current CUDA device (when there is one), NumPy's global generator, Python's random."""

import base64
import random

import numpy as np
import torch

from .storage import CheckpointError


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: str) -> bytes:
    return base64.b64decode(text.encode())


def rng_state() -> dict:
    """This process's generator states (JSON-able); put it in the rank's state of a save."""
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {
        "torch": _b64(torch.get_rng_state().numpy().tobytes()),
        "numpy": {
            "kind": kind,
            "keys": _b64(np.asarray(keys, dtype=np.uint32).tobytes()),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "python": [version, list(internal), gauss_next],
    }
    if torch.cuda.is_available():
        # only the current device: reading every visible device would create a context on each
        state["cuda"] = _b64(torch.cuda.get_rng_state().numpy().tobytes())
    return state


def restore_rng(state: dict) -> None:
    """Restores what rng_state() returned. A saved CUDA state is restored when CUDA is present (a CPU
    resume of a GPU checkpoint keeps CPU, NumPy and Python streams)."""
    try:
        cpu = torch.frombuffer(bytearray(_unb64(state["torch"])), dtype=torch.uint8)
        numpy_state = state["numpy"]
        keys = np.frombuffer(_unb64(numpy_state["keys"]), dtype=np.uint32).copy()
        version, internal, gauss_next = state["python"]
        torch.set_rng_state(cpu)
        np.random.set_state(
            (
                numpy_state["kind"],
                keys,
                numpy_state["pos"],
                numpy_state["has_gauss"],
                numpy_state["cached_gaussian"],
            )
        )
        random.setstate((version, tuple(internal), gauss_next))
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(torch.frombuffer(bytearray(_unb64(state["cuda"])), dtype=torch.uint8))
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"the saved RNG state is not one rng_state() wrote ({err!r})") from err
