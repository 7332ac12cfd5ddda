"""Triton kernels (imported only through :mod:`tensorslim.kernels.ops`)."""
