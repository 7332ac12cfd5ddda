"""Kernel tests run the Triton kernels on CPU tensors under Triton's interpreter (CI has no GPU).

``TRITON_INTERPRET=1`` must be set before the kernels are decorated, i.e. before ``tensorslim.kernels.ops`` is
imported; the ``ops`` fixture does that (and skips when Triton is missing or the kernels were already compiled for a
GPU in this process).
"""

from __future__ import annotations

import importlib
import os
import random
import sys

import pytest
import torch


@pytest.fixture(scope="session")
def ops():
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed (pip install triton to run the kernel tests)")
    if "tensorslim.kernels.ops" not in sys.modules:
        os.environ["TRITON_INTERPRET"] = "1"
    from tensorslim.kernels import ops as mod
    from tensorslim.kernels.triton.int_gemv import int_gemv_kernel

    if type(int_gemv_kernel).__name__ != "InterpretedFunction":
        pytest.skip("kernels were compiled for a GPU in this process; run tests/kernels on its own")
    return mod


class SeededGenerator(torch.Generator):
    """A generator that remembers its seed (``seed_``) so failure messages can name it."""

    seed_: int


@pytest.fixture
def gen() -> SeededGenerator:
    """A fresh random generator per test (fresh seed each run)."""
    g = SeededGenerator()
    g.seed_ = random.SystemRandom().randrange(2**31)
    g.manual_seed(g.seed_)
    return g
