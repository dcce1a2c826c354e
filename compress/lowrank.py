"""Low-rank factorization of Linear and Conv2d layers by truncated SVD.

A Linear ``W`` (out x in) becomes two Linears, ``in -> r`` and ``r -> out``, with
``W ~ (U_r sqrt(S_r)) (sqrt(S_r) V_r^T)``: the best rank-r approximation in Frobenius norm
(Eckart-Young). A Conv2d is factorized through its weight reshaped to
``out x (in kh kw)``: a kh x kw convolution with ``r`` outputs (same stride, padding,
dilation) followed by a 1 x 1 convolution to ``out`` (the *channel* split). That split is
exact SVD on the same matrix LC's low-rank compression uses, works for any kernel size,
and leaves two standard layers that every backend runs fast. The *spatial* split
(kh x 1, then 1 x kw; Jaderberg et al. 2014) needs an iterative fit, not one SVD.

The rank comes from one of three rules (:func:`select_rank`):

- a fixed ``rank``;
- ``energy``: the smallest r keeping that fraction of the squared singular values;
- ``alpha``: LC's rank selection (Idelbayev & Carreira-Perpinan 2020): the r minimising
  ``sum_{i>r} s_i^2 + alpha * r (m + n)``. The approximation error is traded against
  the factorized layer's parameter count. Where even the best r stores more than the dense
  layer (r (m + n) >= m n), the layer stays dense (rank 0 here means "not factorized").

Grouped convolutions are not factorized (their weight is not one matrix).

Example::

    ranks = choose_ranks(model, energy=0.9)      # {"fc1": 37, ...}
    factorize_(model, ranks)                     # fc1 is now Sequential(Linear, Linear)
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

__all__ = ["matrix_of", "select_rank", "factorized", "factorize_", "choose_ranks", "ranks_in",
           "factorizable_layers", "LowRank", "factorize_to_shapes_"]


class LowRank(nn.Sequential):
    """A factorized layer: ``first`` (to ``rank`` outputs) then ``second``. A class of its
    own so a saved model's ranks can be read back from its state_dict shapes."""

    def __init__(self, first: nn.Module, second: nn.Module) -> None:
        super().__init__(first, second)

    @property
    def rank(self) -> int:
        return int(self[0].weight.shape[0])


def factorizable_layers(model: nn.Module) -> list[str]:
    """Every Linear and ungrouped Conv2d, in model order."""
    return [fqn for fqn, m in model.named_modules()
            if isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups == 1)]


def matrix_of(layer: nn.Module) -> torch.Tensor:
    """The layer's weight as a matrix: out x in (Linear), out x (in kh kw) (Conv2d)."""
    w = layer.weight.detach()
    if isinstance(layer, nn.Conv2d) and layer.groups != 1:
        raise ValueError("a grouped convolution's weight is not one matrix: not factorized")
    if not isinstance(layer, (nn.Linear, nn.Conv2d)):
        raise ValueError(f"{type(layer).__name__} is not factorized: allowed Linear, Conv2d")
    return w.reshape(w.shape[0], -1)


def select_rank(s: torch.Tensor, m: int, n: int, *, rank: int | None = None,
                energy: float | None = None, alpha: float | None = None) -> int:
    """The rank one rule picks from singular values ``s`` (descending) of an m x n matrix;
    0 = keep the layer dense (``alpha`` only, where factorizing does not pay)."""
    rules = [k for k, v in (("rank", rank), ("energy", energy), ("alpha", alpha))
             if v is not None]
    if len(rules) != 1:
        raise ValueError(f"give exactly one of rank, energy, alpha (got {rules or 'none'})")
    full = min(m, n)
    if rank is not None:
        if not 1 <= rank <= full:
            raise ValueError(f"rank={rank} is invalid for a {m}x{n} weight: allowed 1.."
                             f"{full}")
        return int(rank)
    power = s.double() ** 2
    if energy is not None:
        if not 0.0 < energy <= 1.0:
            raise ValueError(f"energy={energy} is invalid: allowed 0 < energy <= 1")
        kept = torch.cumsum(power, 0) / power.sum().clamp_min(torch.finfo(torch.float64).tiny)
        return min(full, int((kept < energy - 1e-12).sum()) + 1)
    if not alpha > 0.0:
        raise ValueError(f"alpha={alpha} is invalid: allowed > 0")
    tail = torch.cat([power.flip(0).cumsum(0).flip(0)[1:], power.new_zeros(1)])
    costs = tail + alpha * torch.arange(1, len(s) + 1, dtype=torch.float64) * (m + n)
    best = int(costs.argmin()) + 1
    dense = alpha * m * n  # the dense layer: no error, m n parameters
    return best if best * (m + n) < m * n and float(costs[best - 1]) < dense else 0


def factorized(layer: nn.Module, rank: int) -> LowRank:
    """``layer`` as its best rank-``rank`` factorization (float64 SVD; same dtype and
    device as the layer)."""
    w = matrix_of(layer)
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    if not 1 <= rank <= len(s):
        raise ValueError(f"rank={rank} is invalid for a {w.shape[0]}x{w.shape[1]} weight: "
                         f"allowed 1..{len(s)}")
    root = s[:rank].sqrt()
    first_w = (root[:, None] * vh[:rank]).to(w.dtype)
    second_w = (u[:, :rank] * root[None, :]).to(w.dtype)
    bias = layer.bias is not None
    like = {"dtype": w.dtype, "device": w.device}
    if isinstance(layer, nn.Linear):
        first = nn.Linear(layer.in_features, rank, bias=False, **like)
        second = nn.Linear(rank, layer.out_features, bias=bias, **like)
        first.weight.data.copy_(first_w)
        second.weight.data.copy_(second_w)
    else:
        first = nn.Conv2d(layer.in_channels, rank, layer.kernel_size, layer.stride,
                          layer.padding, layer.dilation, bias=False,
                          padding_mode=layer.padding_mode, **like)
        second = nn.Conv2d(rank, layer.out_channels, 1, bias=bias, **like)
        first.weight.data.copy_(first_w.reshape(first.weight.shape))
        second.weight.data.copy_(second_w.reshape(second.weight.shape))
    if bias:
        second.bias.data.copy_(layer.bias.detach())
    return LowRank(first, second)


def choose_ranks(model: nn.Module, layers: list[str] | None = None, *, rank: int | None = None,
                 energy: float | None = None, alpha: float | None = None) -> dict[str, int]:
    """{layer: rank} by one rule for ``layers`` (default every factorizable one); a layer
    whose rank is 0 (dense is cheaper) is left out."""
    ranks = {}
    for fqn in layers if layers is not None else factorizable_layers(model):
        w = matrix_of(model.get_submodule(fqn))
        s = torch.linalg.svdvals(w.double())
        r = select_rank(s, *w.shape, rank=None if rank is None else min(rank, len(s)),
                        energy=energy, alpha=alpha)
        if r:
            ranks[fqn] = r
    return ranks


def factorize_(model: nn.Module, ranks: Mapping[str, int]) -> nn.Module:
    """Replace each named layer by its rank-r :class:`LowRank` factorization, in place."""
    for fqn, r in ranks.items():
        parent_name, _, child = fqn.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, factorized(model.get_submodule(fqn), int(r)))
    return model


def ranks_in(model: nn.Module) -> dict[str, int]:
    """{layer: rank} of every factorized layer: what rebuilds the architecture."""
    return {fqn: m.rank for fqn, m in model.named_modules() if isinstance(m, LowRank)}


def factorize_to_shapes_(model: nn.Module, shapes: Mapping[str, list[int]]) -> nn.Module:
    """Factorize every layer that ``shapes`` (state_dict key -> shape, e.g. a packed file's
    :func:`quant.packed_shapes`) holds as a :class:`LowRank` pair (``fc1.0.weight`` and
    ``fc1.1.weight`` where the model has ``fc1.weight``), at the rank those shapes
    record; in place. The weights are placeholders until a state_dict is loaded."""
    ranks = {}
    for fqn in factorizable_layers(model):
        first, second = f"{fqn}.0.weight", f"{fqn}.1.weight"
        if f"{fqn}.weight" not in shapes and first in shapes and second in shapes:
            ranks[fqn] = int(shapes[first][0])
    return factorize_(model, ranks)
