"""Where the non-zeros of a sparse tensor are, in as few bytes as this module can: a
bitmask (one bit per element) or relative indices (Deep Compression's: the gap to the
previous non-zero in ``b`` bits, an escape entry ``2^b - 1`` standing for a gap of that
many zeros with no value), whichever is smaller for the tensor. The packed file stores
the positions this way and the values of the non-zeros only.

Example::

    layout = best_layout(nonzero)               # a flat bool numpy array
    data = encode_positions(nonzero, layout)     # bytes
    assert (decode_positions(data, layout, nonzero.size) == nonzero).all()
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from quant.codes import pack_bits, packed_size, unpack_bits

__all__ = ["Layout", "best_layout", "encode_positions", "decode_positions"]

_GAP_BITS = range(1, 17)


@dataclass(frozen=True)
class Layout:
    kind: str  # "bitmask" or "index"
    gap_bits: int = 0  # index: bits per entry
    entries: int = 0  # index: entries in the stream (values plus escapes)

    def nbytes(self, numel: int) -> int:
        """Bytes of the positions of a tensor of ``numel`` elements."""
        if self.kind == "bitmask":
            return (numel + 7) // 8
        return packed_size(self.entries, self.gap_bits)


def _gaps(nonzero: np.ndarray) -> np.ndarray:
    positions = np.flatnonzero(nonzero)
    return np.diff(positions, prepend=-1) - 1


def best_layout(nonzero: np.ndarray) -> Layout:
    """The smaller of a bitmask and relative indices (at the best gap width)."""
    gaps = _gaps(nonzero)
    best = Layout("bitmask")
    best_bytes = best.nbytes(nonzero.size)
    for bits in _GAP_BITS:
        escape = (1 << bits) - 1
        entries = int(gaps.size + (gaps // escape).sum())
        layout = Layout("index", bits, entries)
        if layout.nbytes(nonzero.size) < best_bytes:
            best, best_bytes = layout, layout.nbytes(nonzero.size)
    return best


def encode_positions(nonzero: np.ndarray, layout: Layout) -> bytes:
    if layout.kind == "bitmask":
        return np.packbits(nonzero.astype(np.uint8), bitorder="little").tobytes()
    escape = (1 << layout.gap_bits) - 1
    gaps = _gaps(nonzero)
    escapes = gaps // escape
    stream = np.full(int(gaps.size + escapes.sum()), escape, dtype=np.int64)
    # Each value's entry comes after its escapes: at cumsum(escapes + 1) - 1.
    stream[np.cumsum(escapes + 1) - 1] = gaps % escape
    if stream.size != layout.entries:
        raise ValueError(f"the layout counts {layout.entries} entries, the tensor needs "
                         f"{stream.size}")
    import torch

    return pack_bits(torch.from_numpy(stream), layout.gap_bits)


def decode_positions(data: bytes, layout: Layout, numel: int) -> np.ndarray:
    """The flat bool array of non-zero positions."""
    if layout.kind == "bitmask":
        if len(data) != (numel + 7) // 8:
            raise ValueError(f"a bitmask of {numel} elements takes {(numel + 7) // 8} bytes, "
                             f"not {len(data)}")
        bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8), bitorder="little")
        return bits[:numel].astype(bool)
    if layout.kind != "index" or not 1 <= layout.gap_bits <= 16:
        raise ValueError(f"position layout {layout} is invalid: allowed bitmask or index "
                         "with 1..16 gap bits")
    escape = (1 << layout.gap_bits) - 1
    stream = unpack_bits(data, layout.gap_bits, layout.entries).numpy()
    is_value = stream != escape
    ends = np.cumsum(np.where(is_value, stream + 1, escape)) - 1
    positions = ends[is_value]
    if positions.size and (positions[-1] >= numel or positions[0] < 0):
        raise ValueError(f"relative indices point past the tensor's {numel} elements")
    out = np.zeros(numel, dtype=bool)
    out[positions] = True
    return out
