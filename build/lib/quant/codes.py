"""A tensor in a number format's codes, and bit packing of those codes.

Every format maps a float tensor to unsigned integer codes of ``bits`` bits each plus a
few parameters (scale, zero point, codebook) and back. :class:`Encoded` is that pair;
:func:`pack_bits` / :func:`unpack_bits` store the codes at exactly ``bits`` bits each
(INT4: two per byte), which is what makes a packed artifact's size real.

Example::

    enc = IntFormat(bits=4).quantize(w)
    data = pack_bits(enc.codes, enc.bits)          # ceil(numel * 4 / 8) bytes
    assert torch.equal(unpack_bits(data, enc.bits, enc.codes.numel()), enc.codes.flatten())
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

__all__ = ["Encoded", "pack_bits", "unpack_bits", "packed_size", "all_finite"]


@dataclass
class Encoded:
    """``codes``: int64, values in ``[0, 2**bits)``, the tensor's shape; ``params``: the
    format's parameters (float32 / int tensors, small)."""

    codes: torch.Tensor
    bits: int
    params: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.codes.shape)


def all_finite(x: torch.Tensor) -> bool:
    """Whether ``x`` holds no inf or NaN: one sum (non-finite if any element is; inf +
    -inf is NaN), a fraction of an elementwise check's cost; the exact check only when
    the sum overflowed. QAT asks it of every weight at every step."""
    if x.numel() == 0 or bool(torch.isfinite(x.detach().sum())):
        return True
    return bool(torch.isfinite(x).all())


def packed_size(numel: int, bits: int) -> int:
    """Bytes that ``numel`` codes of ``bits`` bits take packed."""
    return (numel * bits + 7) // 8


def pack_bits(codes: torch.Tensor, bits: int) -> bytes:
    """Codes (any shape, values in ``[0, 2**bits)``) as a little-endian bit stream: code i
    occupies bits ``i*bits .. (i+1)*bits - 1`` (INT4: first code in the low nibble)."""
    flat = codes.detach().flatten().cpu().numpy().astype(np.uint64)
    if flat.size and (flat.max() >> np.uint64(bits)) != 0:
        raise ValueError(f"a code does not fit in {bits} bits (max {int(flat.max())})")
    if bits == 8:
        return flat.astype(np.uint8).tobytes()
    if bits == 16:
        return flat.astype("<u2").tobytes()
    shifts = np.arange(bits, dtype=np.uint64)
    bit_matrix = ((flat[:, None] >> shifts) & np.uint64(1)).astype(np.uint8)
    return np.packbits(bit_matrix.reshape(-1), bitorder="little").tobytes()


def unpack_bits(data: bytes, bits: int, numel: int) -> torch.Tensor:
    """The inverse of :func:`pack_bits`: ``numel`` codes as a flat int64 tensor."""
    if len(data) != packed_size(numel, bits):
        raise ValueError(f"{len(data)} bytes cannot hold {numel} codes of {bits} bits "
                         f"(expected {packed_size(numel, bits)})")
    raw = np.frombuffer(data, dtype=np.uint8)
    if bits == 8:
        flat = raw.astype(np.int64)
    elif bits == 16:
        flat = np.frombuffer(data, dtype="<u2").astype(np.int64)
    else:
        bit_stream = np.unpackbits(raw, count=numel * bits, bitorder="little")
        weights = (1 << np.arange(bits, dtype=np.int64))
        flat = bit_stream.reshape(numel, bits).astype(np.int64) @ weights
    return torch.from_numpy(np.ascontiguousarray(flat))
