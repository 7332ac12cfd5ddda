"""Bit packing of unsigned integer codes (1..8 bits) into bytes.

Layout (the one every kernel and exporter reads): each row is a little-endian bit stream. Code ``j`` of a row occupies
bits ``[j*b, (j+1)*b)`` of the row's stream, bit ``k`` of the stream is bit ``k % 8`` of byte ``k // 8``. So for 4 bits
byte ``i`` holds code ``2i`` in its low nibble and ``2i+1`` in its high nibble; for 2 bits code ``4i+t`` sits at bits
``2t..2t+1`` of byte ``i``; for 3 bits eight codes fill three bytes. Rows are padded to whole bytes.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError


def packed_row_bytes(n: int, bits: int) -> int:
    return (n * bits + 7) // 8


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack ``[rows, n]`` integer codes in ``[0, 2**bits)`` into ``[rows, ceil(n*bits/8)]`` uint8."""
    if not 1 <= bits <= 8:
        raise ConfigError(f"bits must be in 1..8, got {bits}")
    if codes.ndim != 2:
        raise ConfigError(f"pack_codes expects a 2-D tensor, got shape {tuple(codes.shape)}")
    rows, n = codes.shape
    c = codes.to(torch.int64)
    if c.numel() and (int(c.min()) < 0 or int(c.max()) >= (1 << bits)):
        raise ConfigError(f"codes out of range for {bits} bits: [{int(c.min())}, {int(c.max())}]")
    if bits == 8:
        return c.to(torch.uint8).contiguous()
    nbytes = packed_row_bytes(n, bits)
    if 8 % bits == 0:  # fast path: whole codes per byte
        per = 8 // bits
        pad = nbytes * per - n
        if pad:
            c = torch.nn.functional.pad(c, (0, pad))
        shifts = torch.arange(per, device=c.device) * bits
        return (c.reshape(rows, nbytes, per) << shifts).sum(-1).to(torch.uint8)
    # Expand each code to its bits, lay them in one stream per row, regroup by 8.
    shifts = torch.arange(bits, device=c.device)
    stream = ((c.unsqueeze(-1) >> shifts) & 1).reshape(rows, n * bits)
    pad = nbytes * 8 - n * bits
    if pad:
        stream = torch.nn.functional.pad(stream, (0, pad))
    weights = (1 << torch.arange(8, device=c.device)).to(torch.int64)
    return (stream.reshape(rows, nbytes, 8) * weights).sum(-1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: ``[rows, nbytes]`` uint8 -> ``[rows, n]`` int64 codes."""
    if packed.dtype != torch.uint8 or packed.ndim != 2:
        raise ConfigError(f"packed codes must be 2-D uint8, got {packed.dtype} {tuple(packed.shape)}")
    rows = packed.shape[0]
    if packed.shape[1] != packed_row_bytes(n, bits):
        raise ConfigError(
            f"packed row has {packed.shape[1]} bytes, {n} codes of {bits} bits need {packed_row_bytes(n, bits)}"
        )
    p = packed.to(torch.int64)
    if bits == 8:
        return p
    if 8 % bits == 0:  # fast path: whole codes per byte
        per = 8 // bits
        shifts = torch.arange(per, device=p.device) * bits
        return ((p.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)).reshape(rows, -1)[:, :n]
    stream = ((p.unsqueeze(-1) >> torch.arange(8, device=p.device)) & 1).reshape(rows, -1)[:, : n * bits]
    weights = (1 << torch.arange(bits, device=p.device)).to(torch.int64)
    return (stream.reshape(rows, n, bits) * weights).sum(-1)
