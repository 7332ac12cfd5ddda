import pytest
import torch

from tensorslim.errors import ConfigError
from tensorslim.formats.packing import pack_codes, packed_row_bytes, unpack_codes


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [1, 7, 8, 64, 77])
def test_pack_roundtrip_bit_exact(bits, n):
    g = torch.Generator().manual_seed(bits * 100 + n)
    codes = torch.randint(0, 1 << bits, (5, n), generator=g)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (5, packed_row_bytes(n, bits))
    assert torch.equal(unpack_codes(packed, bits, n), codes)


def test_layout_is_little_endian_bitstream():
    # 4 bits: code 2i in the low nibble; 3 bits: eight codes in three bytes, code j at bits 3j..3j+2
    assert pack_codes(torch.tensor([[1, 2]]), 4).tolist() == [[0x21]]
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 0]])
    stream = sum(int(c) << (3 * j) for j, c in enumerate(codes[0]))
    assert pack_codes(codes, 3).tolist() == [[stream & 255, (stream >> 8) & 255, (stream >> 16) & 255]]


def test_out_of_range_codes_rejected():
    with pytest.raises(ConfigError):
        pack_codes(torch.tensor([[16]]), 4)
    with pytest.raises(ConfigError):
        pack_codes(torch.tensor([[-1]]), 4)
