"""The LC algorithm (compress.lc) and its trial stage (trainables.stages.lc): the C steps
are projections onto their sets, LC with a large mu converges to the compressed model,
the packed LC model reloads and scores what was evaluated, resume is exact."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_config
from test_quant_stage import assert_resumes_exactly, packed_accuracy
from torch import nn

from compress.lc import LC, Compression, parse_compression, parse_layer_map, project
from trainables.config import ConfigError, TrialConfig
from trainables.loop import run_trial
from trainables.sessions import LocalSession
from trainables.stages.lc import encode_compressed_, lc_tasks

SPECS = ["codebook:2", "codebook:k=5", "prune:keep=0.1", "prune:kappa=7", "lowrank:rank=3",
         "lowrank:alpha=0.05", "int:bits=4", "int:8"]


def _weight(shape=(12, 20), seed=0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("shape", [(12, 20), (6, 3, 3, 3)])
def test_c_steps_are_idempotent_projections_onto_their_sets(spec: str, shape) -> None:
    w = _weight(shape)
    c = parse_compression(spec)
    once = project(c, w, mu=1.0)
    assert once.shape == w.shape and once.dtype == w.dtype
    torch.testing.assert_close(project(c, once, mu=1.0), once, rtol=1e-6, atol=1e-6)
    matrix = once.reshape(shape[0], -1).double()
    if c.kind == "codebook":
        assert torch.unique(once).numel() <= c.k
    elif c.kind == "prune":
        kept = c.kappa if c.kappa is not None else round(c.keep * w.numel())
        assert int((once != 0).sum()) == kept
    elif c.kind == "lowrank" and c.rank is not None:
        assert int(torch.linalg.matrix_rank(matrix, rtol=1e-5)) == c.rank  # float32 noise
    elif c.kind == "int":
        scale = w.abs().max() / (2 ** (c.bits - 1) - 1)
        levels = once / scale
        torch.testing.assert_close(levels, levels.round(), atol=1e-4, rtol=0)
        assert levels.abs().max() <= 2 ** (c.bits - 1) - 1 + 1e-4


def test_projections_are_the_nearest_points_against_independent_oracles() -> None:
    """float64 references: the top-kappa by magnitude; Eckart-Young's truncated SVD from
    numpy; the codebook is kmeans1d's optimum (no 2-value codebook is closer)."""
    w = _weight((8, 10), seed=3)
    pruned = project(Compression("prune", kappa=5), w)
    order = np.argsort(-np.abs(w.numpy().ravel()), kind="stable")[:5]
    ref = np.zeros(80, dtype=np.float32)
    ref[order] = w.numpy().ravel()[order]
    assert np.array_equal(pruned.numpy().ravel(), ref)
    u, s, vh = np.linalg.svd(w.double().numpy(), full_matrices=False)
    ref = (u[:, :2] * s[:2]) @ vh[:2]
    np.testing.assert_allclose(project(Compression("lowrank", rank=2), w).numpy(), ref,
                               atol=1e-6)
    two = project(Compression("codebook", k=2), w)
    best = float(((two - w) ** 2).sum())
    values = np.sort(w.numpy().ravel())
    for cut in range(1, 80):  # every split of the sorted values into two clusters
        lo, hi = values[:cut], values[cut:]
        err = ((lo - lo.mean()) ** 2).sum() + ((hi - hi.mean()) ** 2).sum()
        assert best <= err + 1e-4


def test_alpha_rank_selection_is_lc_formula_and_rises_with_mu() -> None:
    """r = argmin mu/2 sum_{i>r} s_i^2 + alpha r (m + n), dense where no r pays."""
    q1, _ = torch.linalg.qr(_weight((30, 30), seed=5).double())
    q2, _ = torch.linalg.qr(_weight((40, 30), seed=6).double())
    w = (q1 * 0.5 ** torch.arange(30.0, dtype=torch.float64)) @ q2.T  # s_i = 2^-i
    s = torch.linalg.svdvals(w)
    w = w.float()
    alpha = 1e-4
    ranks = []
    for mu in (0.05, 5.0, 500.0):
        lc = LC({"fc": Compression("lowrank", alpha=alpha)}, mu0=mu, growth=2.0)
        model = nn.Module()
        model.fc = nn.Linear(40, 30)
        model.fc.weight.data.copy_(w)
        lc.c_step(model, -1)
        costs = [mu / 2 * float((s[r:] ** 2).sum()) + alpha * r * 70 for r in range(1, 31)]
        best = int(np.argmin(costs)) + 1
        expect = best if best * 70 < 1200 and costs[best - 1] < alpha * 1200 else 0
        assert lc.ranks()["fc"] == expect
        ranks.append(lc.ranks()["fc"])
    assert ranks == [1, 5, 8]


def test_penalty_gradient_and_multipliers_follow_the_augmented_lagrangian() -> None:
    model = nn.Sequential(nn.Linear(6, 4))
    w0 = model[0].weight.detach().clone()
    lc = LC({"0": Compression("codebook", k=2)}, mu0=0.5, growth=2.0)
    lc.c_step(model, -1)  # direct compression: no multipliers yet
    assert not lc.multipliers
    target = lc.targets["0"]
    model[0].weight.grad = None
    lc.penalty(model, 0).backward()
    torch.testing.assert_close(model[0].weight.grad, 0.5 * (w0 - target))
    with torch.no_grad():
        model[0].weight.add_(0.1)
    lc.c_step(model, 1)  # mu_1 = 1.0
    w1 = model[0].weight.detach()
    torch.testing.assert_close(lc.multipliers["0"], -1.0 * (w1 - lc.targets["0"]))


def test_the_multipliers_shift_both_the_penalty_and_the_c_step() -> None:
    """With lambda set: d penalty / dw = mu (w - Delta) - lambda, and the C step projects
    w - lambda / mu (the augmented Lagrangian), float64 by hand."""
    model = nn.Sequential(nn.Linear(5, 3)).double()
    lc = LC({"0": Compression("prune", kappa=4)}, mu0=0.5, growth=2.0)
    lc.c_step(model, -1)
    with torch.no_grad():
        model[0].weight.mul_(1.5)
    lc.c_step(model, 0)  # mu_0 = 0.5: lambda = -0.5 (w - Delta)
    w = model[0].weight.detach().clone()
    lam = lc.multipliers["0"]
    assert bool((lam != 0).any())
    model[0].weight.grad = None
    lc.penalty(model, 1).backward()  # mu_1 = 1.0
    torch.testing.assert_close(model[0].weight.grad,
                               1.0 * (w - lc.targets["0"]) - lam, rtol=0, atol=1e-6)
    lc.c_step(model, 1)
    torch.testing.assert_close(lc.targets["0"], project(Compression("prune", kappa=4),
                                                        w - lam / 1.0))


def test_the_codebook_c_step_is_plain_k_means_even_with_many_zeros() -> None:
    """A pruned reference (2% exact zeros) gets k-means' optimum, not quant's reserved 0."""
    import kmeans1d

    w = torch.cat([torch.full((2,), 0.0), torch.linspace(0.9, 1.1, 33),
                   torch.linspace(1.9, 2.1, 33), torch.linspace(2.9, 3.1, 32)])
    got = project(Compression("codebook", k=3), w)
    _, centroids = kmeans1d.cluster(w.double().numpy(), 3)
    assert sorted(torch.unique(got).tolist()) == pytest.approx(centroids, abs=1e-6)
    assert 0.0 not in torch.unique(got).tolist()


def test_lc_with_a_large_mu_converges_to_the_compressed_model(tiny_root: Path) -> None:
    """mu grows 10 -> 2560 (the lr falling as 1/mu keeps the penalty's gradient steps
    stable): the L step's weights end on their compressed values."""
    cfg = tiny_config(tiny_root, "model.name=mlp", "model.widths=[16]", "train.epochs=6",
                      "optim.name=gd", "optim.lr=0.05", "optim.schedule=constant",
                      "lc.linear=codebook:2", "lc.steps=5", "lc.mu0=10",
                      "lc.growth=4", "lc.lr_decay=0.25")
    history = run_trial(cfg, LocalSession())
    distances = [h["lc_distance"] for h in history]
    assert distances[-1] < 1e-6 < distances[1]
    assert [h["lc_step"] for h in history] == [-1, 0, 1, 2, 3, 4]
    assert history[-1]["test_acc_lc"] == pytest.approx(history[-1]["test_acc"], abs=2 / 64)


@pytest.mark.parametrize("lc", [["lc.conv=prune:keep=0.2", "lc.linear=lowrank:alpha=1e-4"],
                                ["lc.conv=int:bits=4", "lc.linear=codebook:k=4",
                                 "lc.layers=classifier.net.1=lowrank:rank=2"]])
def test_the_packed_lc_model_reloads_and_scores_what_was_evaluated(
        tiny_root: Path, tmp_path: Path, lc: list[str]) -> None:
    cfg = tiny_config(tiny_root, *lc, "train.epochs=3", "lc.steps=2")
    final = run_trial(cfg, LocalSession(checkpoint_dir=tmp_path / "ckpt"))[-1]
    path = tmp_path / "ckpt" / "artifacts" / "model.qsw"
    assert packed_accuracy(cfg, path) == final["test_acc_lc"]
    assert final["compression_ratio"] == final["fp32_bytes"] / final["packed_bytes"] > 1.5
    assert final["params"] > 0 and final["macs"] > 0


def test_factorized_layers_hold_their_rank_and_packing_reads_it_back(tiny_root: Path) -> None:
    from trainables.models import model_for_trial

    cfg = tiny_config(tiny_root, "lc.layers=classifier.net.1=lowrank:rank=3", "lc.steps=1")
    model = model_for_trial(cfg, (1, 28, 10))
    lc = LC(lc_tasks(cfg, model), 1.0, 2.0)
    lc.c_step(model, -1)
    compressed = encode_compressed_(model, lc)
    layer = compressed.get_submodule("classifier.net.1")
    assert layer.rank == 3 and layer[0].weight.shape[0] == 3


def test_resume_inside_an_l_step_equals_uninterrupted(tiny_root: Path, tmp_path: Path) -> None:
    """Two-epoch L steps: stopped after epoch 1 (inside the reference) and after epoch 2
    (inside L step 0) the resumed trial reports what the uninterrupted one did."""
    cfg = tiny_config(tiny_root, "train.epochs=5", "lc.steps=2", "lc.epochs_per_step=2",
                      "lc.conv=codebook:3", "lc.linear=prune:0.2", "optim.schedule=cosine",
                      "lc.lr_decay=0.5")
    full = run_trial(cfg, LocalSession(checkpoint_dir=tmp_path / "full"))
    assert [h["lc_step"] for h in full] == [-1, 0, 0, 1, 1]
    assert_resumes_exactly(cfg, tmp_path / "a", full)
    crashed = LocalSession(checkpoint_dir=tmp_path / "b" / "ckpt", stop_after=2)
    with pytest.raises(InterruptedError):
        run_trial(cfg, crashed)
    resumed = run_trial(cfg, LocalSession(resume_from=tmp_path / "b" / "ckpt"))
    assert [h["test_acc_lc"] if "test_acc_lc" in h else h.get("test_acc") for h in resumed] \
        == [h["test_acc_lc"] if "test_acc_lc" in h else h.get("test_acc") for h in full]


def test_each_l_step_restarts_the_lr_schedule_scaled_by_lr_decay(tiny_root: Path) -> None:
    cfg = tiny_config(tiny_root, "train.epochs=3", "lc.steps=2", "lc.linear=codebook:2",
                      "optim.schedule=constant", "lc.lr_decay=0.5", "optim.lr=0.08")
    history = run_trial(cfg, LocalSession())
    assert [h["lr"] for h in history] == pytest.approx([0.08, 0.08, 0.04])


def test_direct_compression_is_lc_with_no_steps(tiny_root: Path) -> None:
    """lc.steps=0: train, then one C step: the baseline (train-then-compress)."""
    cfg = tiny_config(tiny_root, "train.epochs=2", "lc.linear=prune:keep=0.1")
    history = run_trial(cfg, LocalSession())
    # Before the end of training: a preview of direct compression, not a C step.
    assert "lc_distance" not in history[0] and "test_acc_lc" in history[0]
    assert history[-1]["lc_step"] == -1 and 0 < history[-1]["lc_distance"] < 1  # 90% pruned
    assert history[-1]["packed_bytes"] < history[-1]["fp32_bytes"] / 2


@pytest.mark.parametrize("overrides, says", [
    (["lc.linear=codebook:1"], "lc.linear='codebook:1' is invalid: codebook:k=1 is invalid: "
                               "allowed an integer in 2..256"),
    (["lc.conv=prune:keep=1.5"], "prune:keep=1.5 is invalid: allowed 0 < value <= 1"),
    (["lc.mu0=0"], "lc.mu0=0.0 is invalid: allowed a value > 0.0"),
    (["lc.growth=1"], "lc.growth=1.0 is invalid: allowed a value > 1.0"),
    (["lc.linear=svd:3"], "allowed kinds none, codebook, prune, lowrank, int"),
    (["lc.linear=codebook:2", "quant.mode=ptq"], "quant.mode='ptq' is invalid: allowed none"),
    (["lc.linear=codebook:2", "prune.schedule=constant"], "prune.schedule='constant' is "
                                                          "invalid: allowed none with lc"),
    (["lc.linear=codebook:2", "lc.steps=4", "train.epochs=3"], "lc.steps=4 is invalid"),
    (["lc.layers=fc1"], "allowed layer=compression"),
])
def test_bad_lc_settings_name_the_field(overrides: list[str], says: str) -> None:
    with pytest.raises(ConfigError, match=None) as info:
        TrialConfig().with_overrides(overrides)
    assert says in str(info.value)


@pytest.mark.parametrize("overrides, says", [
    (["model.name=mlp", "lc.conv=prune:0.1"], "lc.conv='prune:0.1' names no layer: mlp has "
                                              "no Conv2d"),
    (["model.name=mlp", "lc.layers=fc9=codebook:2"], "layer 'fc9' is not in the model"),
    (["model.name=mlp", "model.widths=[8]", "lc.linear=lowrank:rank=9"],
     "lowrank:rank=9 is invalid for net.1 (8x784): allowed 1..8"),
    (["model.name=mlp", "model.widths=[8]", "lc.layers=net.3=prune:kappa=100"],
     "prune:kappa=100 is invalid for net.3: allowed 1..80"),
    (["model.name=resnet20", "lc.layers=blocks.0.bn1=lowrank:rank=1"],
     "layer 'blocks.0.bn1' is a BatchNorm2d, not a Linear or Conv2d"),
    (["model.name=mlp", "lc.linear=codebook:2", "lc.layers=net.1=none;net.3=none;net.5=none"],
     "leaving LC nothing to compress"),
    (["model.name=mobilenet_v3_small", "lc.layers=features.1.block.0.0=lowrank:rank=2"],
     "lc.layers='features.1.block.0.0=lowrank:rank=2' is invalid: lowrank is invalid for "
     "features.1.block.0.0 (a grouped convolution"),
])
def test_a_compression_map_that_does_not_fit_the_model_names_the_field(
        overrides: list[str], says: str) -> None:
    from trainables.models import model_for_trial

    cfg = TrialConfig().with_overrides(["train.epochs=2", *overrides])
    shape = (3, 32, 10) if "resnet" in cfg.model.name or "mobile" in cfg.model.name \
        else (1, 28, 10)
    with pytest.raises(ConfigError) as info:
        lc_tasks(cfg, model_for_trial(cfg, shape))
    assert says in str(info.value)


def test_a_type_wide_low_rank_leaves_depthwise_convolutions_alone() -> None:
    from trainables.models import model_for_trial

    cfg = TrialConfig().with_overrides(["model.name=mobilenet_v3_small", "lc.conv=lowrank:2"])
    model = model_for_trial(cfg, (3, 32, 10))
    tasks = lc_tasks(cfg, model)
    assert tasks and all(model.get_submodule(n).groups == 1 for n in tasks)


def test_layer_maps_parse_and_print_back() -> None:
    parsed = parse_layer_map("fc1=lowrank:alpha=1e-6; fc3=codebook:2")
    assert {n: str(c) for n, c in parsed.items()} == {"fc1": "lowrank:alpha=1e-06",
                                                       "fc3": "codebook:k=2"}
    with pytest.raises(ValueError, match="inf or NaN"):
        project(Compression("codebook", k=2), torch.tensor([1.0, float("nan")]))


def test_the_lr_schedule_restarts_per_l_step_step_by_step() -> None:
    """Cosine over 2 reference epochs, then over each 1-epoch L step from lr x 0.5^k
    (4 steps per epoch): every optimizer step's lr against the formula."""
    import math

    from trainables.loop import build_schedule
    from trainables.stages.base import TrainingPlan
    from trainables.stages.lc import LCStage

    cfg = TrialConfig().with_overrides([
        "train.epochs=4", "lc.steps=2", "lc.linear=codebook:2", "lc.lr_decay=0.5",
        "optim.schedule=cosine", "optim.warmup_fraction=0", "optim.lr=1.0"])
    stage = LCStage(cfg)
    stage.plan(TrainingPlan(4, 4))
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_schedule(opt, cfg.optim, 4, 4, stage.lr_segment)
    seen = []
    for _ in range(16):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()

    def cosine(i: int, n: int) -> float:
        return 0.5 * (1 + math.cos(math.pi * i / n))

    expect = [cosine(i, 8) for i in range(8)] + [cosine(i, 4) for i in range(4)] + \
        [0.5 * cosine(i, 4) for i in range(4)]
    assert seen == pytest.approx(expect)
