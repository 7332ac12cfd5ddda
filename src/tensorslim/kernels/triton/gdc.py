"""Grid dependency control (programmatic dependent launch) where this Triton has it (3.3+), else no-op stand-ins.

``HAS_GDC`` tells :func:`tensorslim.kernels.ops.pdl_ok` whether a dependent launch may be requested at all; with an
older Triton the kernels compile without it and run as ordinary, stream-ordered launches.
"""

from __future__ import annotations

import triton
import triton.language as tl

try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

    HAS_GDC = True
except ImportError:  # Triton < 3.3
    HAS_GDC = False

    @triton.jit
    def gdc_wait():  # type: ignore[no-redef]
        tl.static_assert(True)  # nothing to wait for: launches stay stream-ordered

    @triton.jit
    def gdc_launch_dependents():  # type: ignore[no-redef]
        tl.static_assert(True)  # nothing to signal

__all__ = ["HAS_GDC", "gdc_launch_dependents", "gdc_wait"]
