"""Pruning (compress/ and the prune stage): schedules against the formula by hand, exact
sparsity per layer and globally, masks that only grow, masks that hold through every
optimizer (its state zeroed where pruned), exact resume mid-schedule, prune + QAT in one
packed model, and bad schedules refused with the field's name."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import tiny_config
from test_quant_stage import assert_resumes_exactly, packed_accuracy
from torch import nn

import compress
import optim
from compress import SparsitySchedule, attach_masks_, prune_to_, sparsity_of
from compress.prune import masked_layers
from trainables.config import ConfigError, TrialConfig
from trainables.loop import run_trial
from trainables.sessions import LocalSession, load_state_file


def zhu_gupta(t: int, s_i: float, s_f: float, t0: int, n: int, dt: int) -> float:
    """Zhu & Gupta 2017, eq. 1, in float64: s_f + (s_i - s_f)(1 - (t - t0)/(n dt))^3."""
    return s_f + (s_i - s_f) * (1.0 - (t - t0) / (n * dt)) ** 3


def test_polynomial_schedule_by_hand() -> None:
    # 1000 steps, start 0.1 (step 100), end 0.9 (step 900), every 50 steps: n dt = 800.
    s = SparsitySchedule("polynomial", initial=0.1, final=0.7, start=0.1, end=0.9,
                         frequency=50)
    assert s.sparsity_at(0, 1000) == 0.0 and s.sparsity_at(99, 1000) == 0.0
    assert s.sparsity_at(100, 1000) == pytest.approx(0.1)  # the first update: s_i
    for t in (150, 400, 850):
        assert s.sparsity_at(t, 1000) == pytest.approx(zhu_gupta(t, 0.1, 0.7, 100, 16, 50))
    # Held between updates, s_f from the end on.
    assert s.sparsity_at(449, 1000) == s.sparsity_at(400, 1000)
    assert s.sparsity_at(900, 1000) == s.sparsity_at(1000, 1000) == 0.7
    assert s.changes_at(150, 1000) and not s.changes_at(151, 1000)
    values = [s.sparsity_at(t, 1000) for t in range(1001)]
    assert values == sorted(values)  # never falls


def test_oneshot_and_constant_schedules() -> None:
    oneshot = SparsitySchedule("oneshot", final=0.6, start=0.5)
    assert oneshot.sparsity_at(49, 100) == 0.0 and oneshot.sparsity_at(50, 100) == 0.6
    assert SparsitySchedule("constant", final=0.3).sparsity_at(0, 100) == 0.3
    assert SparsitySchedule().sparsity_at(50, 100) == 0.0


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 26 * 26, 10))


def test_exact_sparsity_per_layer_and_global() -> None:
    model = attach_masks_(_net())
    prune_to_(model, 0.5)
    for layer in masked_layers(model).values():
        assert int((layer.weight == 0).sum()) == round(0.5 * layer.weight.numel())
    weights = [layer.parametrizations["weight"].original.detach().abs().flatten()
               for layer in masked_layers(model).values()]
    model = attach_masks_(_net())
    prune_to_(model, 0.9, scope="global")
    total = sum(w.numel() for w in weights)
    assert sparsity_of(model) == round(0.9 * total) / total
    # One threshold over all layers: every kept |w| >= every pruned |w|.
    kept, pruned = [], []
    for layer in masked_layers(model).values():
        stored = layer.parametrizations["weight"].original.detach().abs()
        mask = layer.parametrizations["weight"][0].mask.bool()
        kept.append(stored[mask])
        pruned.append(stored[~mask])
    assert torch.cat(kept).min() >= torch.cat(pruned).max()


def test_masks_only_grow_and_keep_their_zeros() -> None:
    model = attach_masks_(_net())
    prune_to_(model, 0.5)
    first = {k: layer.parametrizations["weight"][0].mask.clone()
             for k, layer in masked_layers(model).items()}
    with torch.no_grad():  # the stored weights change: the old pruned ones stay pruned
        for layer in masked_layers(model).values():
            layer.parametrizations["weight"].original.normal_()
    prune_to_(model, 0.3)  # lower: nothing changes
    prune_to_(model, 0.7)
    for key, layer in masked_layers(model).items():
        mask = layer.parametrizations["weight"][0].mask
        assert bool((mask <= first[key]).all())
        assert int((mask == 0).sum()) == round(0.7 * mask.numel())


def test_a_model_with_nothing_to_prune_is_refused() -> None:
    with pytest.raises(ValueError, match="no pruning masks"):
        prune_to_(nn.Sequential(nn.ReLU()), 0.5)
    with pytest.raises(ValueError, match="no prunable weights"):
        sparsity_of(nn.Sequential(nn.ReLU()))


@pytest.mark.parametrize("name", sorted(set(optim.available()) - {"gd"}))
def test_masks_hold_through_every_optimizer(tiny_root: Path, tmp_path: Path, name: str
                                            ) -> None:
    """A polynomial schedule grows the masks during training; at the end every pruned
    weight is exactly 0 in the model, its stored value and the optimizer state of its
    shape are 0 too, and the reported sparsity is the schedule's."""
    lr = {"eg": 0.5, "egpm": 0.5, "adam_eg": 0.01, "adam_gd": 0.01, "madam": 0.01,
          "lns_madam": 2 ** -5}.get(name, 0.05)
    cfg = tiny_config(tiny_root, f"optim.name={name}", f"optim.lr={lr}", "train.epochs=2",
                      "prune.schedule=polynomial", "prune.final_sparsity=0.6",
                      "prune.end=0.5", "prune.frequency=3")
    history = run_trial(cfg, LocalSession(checkpoint_dir=tmp_path / "ckpt"))
    assert history[-1]["sparsity"] >= 0.6 - 1e-3
    state = load_state_file(tmp_path / "ckpt")
    weights = state["model"]
    masks = {k.removesuffix(".parametrizations.weight.0.mask"): v
             for k, v in weights.items() if k.endswith(".parametrizations.weight.0.mask")}
    assert masks
    for layer, mask in masks.items():
        stored = weights[f"{layer}.parametrizations.weight.original"]
        assert bool((stored[mask == 0] == 0).all()), layer
        assert int((mask == 0).sum()) == round(0.6 * mask.numel())
    for entry in state["optimizer"]["state"].values():
        for value in entry.values():
            if torch.is_tensor(value) and value.dim() >= 2:
                matching = [m for m in masks.values() if m.shape == value.shape]
                if len(matching) == 1:
                    assert bool((value[matching[0] == 0] == 0).all())


def test_pruning_resumes_exactly_mid_schedule(tiny_root: Path, tmp_path: Path) -> None:
    cfg = tiny_config(tiny_root, "prune.schedule=polynomial", "prune.final_sparsity=0.8",
                      "prune.start=0.2", "prune.end=0.9", "prune.frequency=2")
    full = run_trial(cfg, LocalSession())
    assert 0 < full[0]["sparsity"] < full[1]["sparsity"] < full[2]["sparsity"]
    assert_resumes_exactly(cfg, tmp_path, full)


def test_prune_then_qat_int4_packs_one_model_keeping_the_zeros(tiny_root: Path,
                                                               tmp_path: Path) -> None:
    cfg = tiny_config(tiny_root, "prune.schedule=constant", "prune.final_sparsity=0.7",
                      "prune.scope=global", "quant.mode=qat", "quant.bits=4",
                      "quant.per_channel=true", "train.epochs=2")
    final = run_trial(cfg, LocalSession(checkpoint_dir=tmp_path / "ckpt"))[-1]
    assert final["sparsity"] >= 0.7
    packed = tmp_path / "ckpt" / "artifacts" / "model.qsw"
    assert packed_accuracy(cfg, packed) == final["test_acc_q"]
    from trainables.data import load_splits
    from trainables.models import build_model

    splits = load_splits(cfg.data, seed=0)
    model = build_model(cfg.model, splits.in_channels, splits.image_size, splits.num_classes)
    import quant

    quant.load_packed(packed, model)
    assert compress.sparsity_of(model) == pytest.approx(final["sparsity"])


@pytest.mark.parametrize("overrides, says", [
    (["prune.final_sparsity=1.0"], "prune.final_sparsity=1.0 is invalid: allowed a value >= 0"),
    (["prune.final_sparsity=-0.1"], "prune.final_sparsity=-0.1 is invalid"),
    (["prune.initial_sparsity=0.6", "prune.final_sparsity=0.5"],
     "prune.final_sparsity=0.5 is invalid: allowed >= prune.initial_sparsity (0.6)"),
    (["prune.schedule=polynomial", "prune.start=0.5", "prune.end=0.5"],
     "prune.end=0.5 is invalid: allowed > prune.start (0.5)"),
    (["prune.frequency=0"], "prune.frequency=0 is invalid"),
    (["prune.schedule=cubic"], "prune.schedule='cubic' is invalid: allowed one of none, "
                               "oneshot, constant, polynomial"),
])
def test_bad_schedules_name_the_field(overrides: list[str], says: str) -> None:
    with pytest.raises(ConfigError) as error:
        TrialConfig().with_overrides(overrides)
    assert says in str(error.value)


def test_a_pruned_trial_is_labelled() -> None:
    from sweeps.tracking import trial_run_name, trial_tags

    flat = TrialConfig().with_overrides(["prune.schedule=polynomial",
                                         "prune.final_sparsity=0.7", "quant.mode=qat",
                                         "quant.bits=8"]).to_flat()
    assert trial_run_name(flat) == "sgd prune0.7-polynomial int8-qat s0"
    assert trial_tags(flat, "search")["prune"] == "prune0.7-polynomial"
    assert math.isfinite(flat["prune.final_sparsity"])


def test_the_lowest_k_equal_a_stable_sorts_first_k_ties_included() -> None:
    from compress.prune import _lowest

    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        n = int(torch.randint(1, 60, (1,), generator=g))
        scores = torch.randint(-1, 4, (n,), generator=g).float()  # many ties
        k = int(torch.randint(1, n + 1, (1,), generator=g))
        oracle = torch.zeros(n, dtype=torch.bool)
        oracle[torch.sort(scores, stable=True).indices[:k]] = True
        assert torch.equal(_lowest(scores, k), oracle)


@pytest.mark.parametrize("precision", ["amp_bf16", "amp_fp16"])
def test_masks_hold_under_autocast(tiny_root: Path, tmp_path: Path, precision: str) -> None:
    """Under autocast (and fp16's gradient scaler, which may skip a step) a pruned weight
    stays exactly 0: the mask multiplies the float32 weight before autocast casts it."""
    cfg = tiny_config(tiny_root, f"precision.mode={precision}", "train.epochs=1",
                      "data.train_subset=96", "prune.schedule=polynomial",
                      "prune.final_sparsity=0.5", "prune.end=0.5", "prune.frequency=1")
    final = run_trial(cfg, LocalSession(checkpoint_dir=tmp_path / "ckpt"))[-1]
    assert final["sparsity"] >= 0.5 - 1e-3
    weights = load_state_file(tmp_path / "ckpt")["model"]
    for key, mask in weights.items():
        if key.endswith(".parametrizations.weight.0.mask"):
            stored = weights[key.replace("0.mask", "original")]
            assert bool((stored[mask == 0] == 0).all()) and bool((mask == 0).any())


def test_a_codebook_keeps_pruned_weights_at_exactly_zero() -> None:
    """k-1 centroids fitted to the non-zero values (kmeans1d's optimum on them alone),
    plus an entry of 0 for the zeros."""
    import kmeans1d

    from quant import CodebookFormat

    g = torch.Generator().manual_seed(0)
    w = torch.randn(40, 30, generator=g)
    w[torch.rand(40, 30, generator=g) < 0.7] = 0.0
    enc = CodebookFormat(k=4).quantize(w)
    q = CodebookFormat(k=4).dequantize(enc)
    assert bool((q[w == 0] == 0).all()) and int((q == 0).sum()) == int((w == 0).sum())
    _, centroids = kmeans1d.cluster(w[w != 0].double().numpy(), 3)
    expected = sorted([0.0, *centroids])
    torch.testing.assert_close(enc.params["codebook"].double(),
                               torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-6)


def test_prune_then_codebook_qat_packs_the_zeros_sparse(tiny_root: Path, tmp_path: Path
                                                        ) -> None:
    """Deep Compression's pipeline: 70% pruned, then a 4-entry codebook: the packed model
    is still 70% zeros (on the 0 entry), its weights stored sparse, and it scores what was
    evaluated."""
    from test_quant_stage import packed_accuracy

    import quant
    from trainables.models import model_for_packed

    cfg = tiny_config(tiny_root, "prune.schedule=polynomial", "prune.final_sparsity=0.7",
                      "prune.end=0.6", "prune.frequency=2", "quant.mode=qat",
                      "quant.format=codebook", "quant.k=4", "train.epochs=2")
    final = run_trial(cfg, LocalSession(checkpoint_dir=tmp_path / "ckpt"))[-1]
    packed = tmp_path / "ckpt" / "artifacts" / "model.qsw"
    assert packed_accuracy(cfg, packed) == final["test_acc_q"]
    model = model_for_packed(cfg, (1, 28, 10), packed)
    assert compress.sparsity_of(model) >= 0.7
    header = quant.packed._read_header(packed)[1]
    weights = [e for e in header["tensors"] if e["name"].endswith("weight")]
    assert weights and all("sparse" in e and e["bits"] == 2 for e in weights)


def test_a_stray_zero_gets_no_entry_and_k2_with_pruning_is_refused() -> None:
    """Under 1% zeros the fit is plain k-means (kmeans1d over every value); k=2 cannot
    spare an entry for pruned zeros: refused before any training."""
    import kmeans1d

    from quant import CodebookFormat

    w = torch.randn(40, 30, generator=torch.Generator().manual_seed(1))
    w[0, 0] = 0.0
    enc = CodebookFormat(k=4).quantize(w)
    _, centroids = kmeans1d.cluster(w.flatten().double().numpy(), 4)
    torch.testing.assert_close(enc.params["codebook"].double(),
                               torch.tensor(centroids, dtype=torch.float64), rtol=0, atol=1e-6)
    with pytest.raises(ConfigError) as error:
        TrialConfig().with_overrides(["prune.schedule=constant", "quant.mode=qat",
                                      "quant.format=codebook", "quant.k=2"])
    assert "quant.k=2 is invalid: allowed >= 3 with prune.schedule=constant" in \
        str(error.value)
