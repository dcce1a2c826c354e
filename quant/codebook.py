"""Codebook (k-means) formats: each weight tensor gets its own ``k`` values and every
element stores the index of one, at ``ceil(log2 k)`` bits.

The codebook is the optimal 1-D k-means of the tensor's values (least squared error;
a tensor that is at least 1% exact zeros, pruned weights, keeps an entry of exactly 0
for them and fits k-1 to the rest, when k >= 3),
from the ``kmeans1d`` package: scalar k-means has an exact dynamic-programming solution
(O(k n log n)), so no seeded k-means++ restarts are needed and the result does not depend
on a seed (``bench/codebook.py`` compares the two on real layers: SQNR and time).

Example::

    fmt = CodebookFormat(k=4)
    w_q = fmt.fake_quantize(w)          # every value is one of 4 per-tensor centroids
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from quant.codes import Encoded

__all__ = ["CodebookFormat", "ZERO_SHARE"]

ZERO_SHARE = 0.01  # exact zeros from this share of a tensor on get a 0 entry (pruning)


@dataclass(frozen=True)
class CodebookFormat:
    k: int = 16

    def __post_init__(self) -> None:
        if not isinstance(self.k, int) or isinstance(self.k, bool) or not 2 <= self.k <= 256:
            raise ValueError(f"k={self.k!r} is invalid: allowed an integer in 2..256")

    @property
    def name(self) -> str:
        return f"kmeans{self.k}"

    @property
    def bits(self) -> int:
        return math.ceil(math.log2(self.k))

    def quantize(self, x: torch.Tensor) -> Encoded:
        """Indices (``bits`` bits each) and the sorted float32 codebook of ``k`` values."""
        flat = x.detach().flatten().double().cpu()
        if not torch.isfinite(flat).all():
            raise ValueError("cannot fit a codebook to NaN or inf")
        unique = torch.unique(flat)
        if len(unique) <= self.k:  # every value its own centroid (k-means' optimum too)
            centroids = unique
            index = torch.searchsorted(unique, flat)
        elif self.keeps_zero(flat):
            centroids, index = _with_zero_entry(flat, self.k)
        else:
            import kmeans1d

            clusters, centroids = kmeans1d.cluster(flat.numpy(), self.k)
            index = torch.as_tensor(clusters, dtype=torch.int64)
            centroids = torch.as_tensor(centroids, dtype=torch.float64)
        codebook = torch.zeros(self.k, dtype=torch.float32)  # unused entries stay 0
        codebook[: len(centroids)] = centroids.float()
        return Encoded(index.reshape(x.shape).to(x.device), self.bits,
                       {"codebook": codebook.to(x.device)})

    def keeps_zero(self, x: torch.Tensor) -> bool:
        """Whether a fit to ``x`` reserves an entry of exactly 0: k >= 3 and at least
        ``ZERO_SHARE`` of ``x`` exact zeros (pruned weights; a stray zero in a dense
        tensor is not worth one of k entries, and with k = 2 the rest would share one)."""
        return self.k >= 3 and int((x == 0).sum()) >= ZERO_SHARE * x.numel()

    def assign(self, x: torch.Tensor, codebook: torch.Tensor) -> Encoded:
        """Indices of the nearest entries of a given ``codebook`` (QAT between refits)."""
        flat = x.detach().reshape(-1, 1).float()
        index = torch.cat([(chunk - codebook.reshape(1, -1)).abs().argmin(1)
                           for chunk in flat.split(1 << 16)]) if flat.numel() else \
            torch.zeros(0, dtype=torch.int64)
        return Encoded(index.reshape(x.shape), self.bits, {"codebook": codebook.clone()})

    def dequantize(self, enc: Encoded, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return enc.params["codebook"][enc.codes].to(dtype)

    def fake_quantize(self, x: torch.Tensor) -> torch.Tensor:
        return self.dequantize(self.quantize(x), dtype=x.dtype)


def _with_zero_entry(flat: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sorted centroids, index) for a tensor holding exact zeros (pruned weights): the
    optimal k-1 centroids of the non-zero values, plus an entry of exactly 0 that every
    zero maps to (Deep Compression's order: prune, then share weights among the rest),
    so pruning survives the codebook and the packed file stores the zeros by position."""
    import kmeans1d

    nonzero = flat != 0
    clusters, centroids = kmeans1d.cluster(flat[nonzero].numpy(), k - 1)
    centroids = torch.as_tensor(centroids, dtype=torch.float64)
    at = int(torch.searchsorted(centroids, torch.zeros((), dtype=torch.float64)))
    index = torch.full(flat.shape, at, dtype=torch.int64)
    clusters = torch.as_tensor(clusters, dtype=torch.int64)
    index[nonzero] = clusters + (clusters >= at).to(torch.int64)
    zero = torch.zeros(1, dtype=torch.float64)
    return torch.cat([centroids[:at], zero, centroids[at:]]), index
