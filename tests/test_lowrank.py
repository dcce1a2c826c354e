"""Low-rank factorization (compress/lowrank.py): full rank reproduces the layer (float64),
truncated SVD is Eckart-Young's best approximation, the three rank rules against hand
examples, parameters and MACs (torch's flop counter) fall, a factorized model's ranks
rebuild it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from compress import lowrank
from trainables.models import MLP, LeNet, macs_of


@pytest.mark.parametrize("layer, x", [
    (nn.Linear(20, 12), torch.randn(5, 20)),
    (nn.Conv2d(3, 8, 3, stride=2, padding=1), torch.randn(2, 3, 9, 9)),
    (nn.Conv2d(4, 6, (3, 5), padding=(1, 2), dilation=1, bias=False), torch.randn(2, 4, 7, 7)),
])
def test_full_rank_reproduces_the_layer_in_float64(layer: nn.Module, x: torch.Tensor) -> None:
    torch.manual_seed(0)
    layer = layer.double()
    x = x.double()
    full = min(lowrank.matrix_of(layer).shape)
    torch.testing.assert_close(lowrank.factorized(layer, full)(x), layer(x), rtol=1e-10,
                               atol=1e-10)


def test_truncation_is_the_best_rank_r_approximation() -> None:
    """The factorized weight equals the SVD truncation, whose error is the tail of the
    singular values (Eckart-Young)."""
    torch.manual_seed(0)
    layer = nn.Linear(30, 16).double()
    w = layer.weight.detach()
    s = torch.linalg.svdvals(w)
    low = lowrank.factorized(layer, 5)
    product = low[1].weight.detach() @ low[0].weight.detach()
    assert torch.linalg.matrix_rank(product) == 5
    assert float(torch.linalg.matrix_norm(w - product) ** 2) == \
        pytest.approx(float((s[5:] ** 2).sum()), rel=1e-9)


def test_energy_rank_by_hand() -> None:
    # squared values 16, 4, 1, 1 of 22: r=1 keeps 0.727, r=2 0.909, r=3 0.955, r=4 1
    s = torch.tensor([4.0, 2.0, 1.0, 1.0])
    assert lowrank.select_rank(s, 4, 6, energy=0.7) == 1
    assert lowrank.select_rank(s, 4, 6, energy=0.9) == 2
    assert lowrank.select_rank(s, 4, 6, energy=20 / 22) == 2  # exactly reached
    assert lowrank.select_rank(s, 4, 6, energy=0.95) == 3
    assert lowrank.select_rank(s, 4, 6, energy=1.0) == 4


def test_alpha_rank_by_hand() -> None:
    """cost(r) = sum_{i>r} s_i^2 + alpha r (m + n), m = n = 10 (dense: 100 parameters)."""
    s = torch.tensor([10.0, 5.0, 1.0, 0.5, 0.1, 0.0, 0.0, 0.0, 0.0, 0.0])
    # alpha 0.1: r=1: 26.26 + 2 = 28.26; r=2: 1.26 + 4 = 5.26; r=3: 0.26 + 6 = 6.26
    assert lowrank.select_rank(s, 10, 10, alpha=0.1) == 2
    # alpha 0.001: r=2 1.26+0.04, r=3 0.26+0.06, r=4 0.01+0.08=0.09, r=5 0+0.1 -> 4
    assert lowrank.select_rank(s, 10, 10, alpha=0.001) == 4
    # alpha 10: r=1 costs 26.26 + 200 = 226.26 (r=2: 401.26), below the dense layer's
    # alpha x 100 = 1000, and stores 20 < 100 parameters: rank 1
    assert lowrank.select_rank(s, 10, 10, alpha=10.0) == 1
    # a 2 x 2 matrix: any rank stores r x 4 >= 4 = m n: dense (0)
    assert lowrank.select_rank(torch.tensor([3.0, 1.0]), 2, 2, alpha=0.01) == 0


@pytest.mark.parametrize("kwargs, says", [
    ({"rank": 0}, "rank=0 is invalid for a 4x6 weight: allowed 1..4"),
    ({"rank": 5}, "rank=5 is invalid for a 4x6 weight: allowed 1..4"),
    ({"energy": 0.0}, "energy=0.0 is invalid"),
    ({"alpha": 0.0}, "alpha=0.0 is invalid: allowed > 0"),
    ({}, "give exactly one of rank, energy, alpha"),
    ({"rank": 2, "energy": 0.5}, "give exactly one of rank, energy, alpha"),
])
def test_bad_rank_rules_name_the_value(kwargs: dict, says: str) -> None:
    with pytest.raises(ValueError) as error:
        lowrank.select_rank(torch.ones(4), 4, 6, **kwargs)
    assert says in str(error.value)


def test_a_factorized_lenet_has_fewer_parameters_and_macs_and_rebuilds_from_its_ranks(
        ) -> None:
    torch.manual_seed(0)
    model = LeNet(1, 28, 10, (6, 16), (120, 84), 5).eval()
    x = torch.randn(4, 1, 28, 28)
    dense = (sum(p.numel() for p in model.parameters()), macs_of(model, x[:1]))
    ranks = lowrank.choose_ranks(model, ["features.3", "classifier.net.1"], rank=4)
    assert ranks == {"features.3": 4, "classifier.net.1": 4}
    lowrank.factorize_(model, ranks)
    assert isinstance(model.get_submodule("classifier.net.1"), lowrank.LowRank)
    assert lowrank.ranks_in(model) == ranks
    cut = (sum(p.numel() for p in model.parameters()), macs_of(model, x[:1]))
    assert cut[0] < dense[0] and cut[1] < dense[1]
    fresh = lowrank.factorize_(LeNet(1, 28, 10, (6, 16), (120, 84), 5),
                               lowrank.ranks_in(model))
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), model(x))


def test_energy_one_keeps_every_layer_exact_and_grouped_convs_are_skipped() -> None:
    model = MLP(20, (8,), 3).double()
    x = torch.randn(3, 20, dtype=torch.float64)
    expected = model(x)
    lowrank.factorize_(model, lowrank.choose_ranks(model, energy=1.0))
    torch.testing.assert_close(model(x), expected, rtol=1e-10, atol=1e-10)
    grouped = nn.Sequential(nn.Conv2d(4, 4, 3, groups=4), nn.Conv2d(4, 2, 1))
    assert lowrank.factorizable_layers(grouped) == ["1"]
