"""Shared checks for the grid-format tests."""

from __future__ import annotations

import torch

from tensorslim.formats.base import weight_class


def check_storage(cw) -> None:
    """nbytes matches the spec and the weight rebuilds bit-identically from its stored tensors."""
    assert cw.nbytes == cw.format.nbytes(cw.shape)
    again = weight_class(cw.format).from_tensors(cw.format, cw.shape, cw.tensors())
    assert torch.equal(again.decode(), cw.decode())
