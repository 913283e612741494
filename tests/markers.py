"""Device parametrization shared by the test files (one definition, imported everywhere).

`pytest.mark.cuda` (registered in conftest.py): the test needs a CUDA GPU and is skipped without one. Tests that
take the `triton_device` fixture get `pytest.mark.triton`. bench/gpu/run.sh selects `-m "cuda or triton"`.
"""

import pytest

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
