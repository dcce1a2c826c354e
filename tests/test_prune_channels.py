"""Structured (channel) pruning: the dependency groups torch-pruning traces (uncoupled
layers only), exact channel counts, the cut model computing what the masked one did,
fewer parameters and MACs (torch's flop counter), the packed smaller model rebuilt and
scoring exactly what the trial evaluated (alone and with INT8 QAT / PTQ), masks and
zeroed biases and batch norms holding through training and resume, bad input refused."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from conftest import tiny_config
from test_quant_stage import assert_resumes_exactly
from torch import nn

import compress
from compress import channels
from trainables.config import ConfigError, TrialConfig
from trainables.loop import run_trial
from trainables.models import CifarResNet, LeNet, model_for_packed
from trainables.sessions import LocalSession, load_state_file


def _warm(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Non-trivial batch-norm statistics."""
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(x + torch.randn_like(x))
    return model.eval()


def _masked(model: nn.Module, x: torch.Tensor, sparsity: float):
    groups, skipped = channels.channel_groups(model, x[:1])
    compress.attach_masks_(model, lambda m, fqn: fqn in {g.root for g in groups})
    channels.prune_channels_(model, groups, sparsity)
    channels.zero_followers_(model, groups)
    return groups, skipped


def test_resnet20_groups_are_the_blocks_first_convolutions() -> None:
    """The residual sums tie every other conv (and the option-A shortcut's padding makes
    the tracer's grouping wrong there): only each block's conv1 is pruned alone."""
    model = CifarResNet(20, 3, 10)
    groups, skipped = channels.channel_groups(model, torch.zeros(1, 3, 32, 32))
    assert [g.root for g in groups] == [f"blocks.{i}.conv1" for i in range(9)]
    assert all(g.norms == (g.root.replace("conv1", "bn1"),) for g in groups)
    assert all(g.consumers == (g.root.replace("conv1", "conv2"),) for g in groups)
    assert "residual" in skipped["blocks.0.conv2"]
    assert skipped["fc"] == "its outputs are the model's outputs"


def test_exact_channel_counts_lowest_l2_norms_and_masks_only_grow() -> None:
    torch.manual_seed(0)
    model = LeNet(1, 28, 10, (6, 16), (120, 84), 5)
    x = torch.randn(4, 1, 28, 28)
    norms_of = {n: m.weight.detach().reshape(m.weight.shape[0], -1).norm(dim=1)
                for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    groups, _ = _masked(model, x, 0.5)
    for g in groups:
        layer = model.get_submodule(g.root)
        norms = norms_of[g.root]  # before pruning (zeroed consumer columns change them)
        pruned = channels.pruned_channels(model, groups)[g.root]
        assert len(pruned) == round(0.5 * g.channels)
        oracle = torch.sort(norms, stable=True).indices[:len(pruned)]
        assert sorted(pruned.tolist()) == sorted(oracle.tolist())
        assert bool((layer.weight[pruned] == 0).all())
        assert bool((layer.bias[pruned] == 0).all())
    before = channels.pruned_channels(model, groups)
    with torch.no_grad():  # the pruned channels' stored weights grow large: still pruned
        for g in groups:
            model.get_submodule(g.root).parametrizations["weight"].original.mul_(100)
    channels.prune_channels_(model, groups, 0.75)
    after = channels.pruned_channels(model, groups)
    for g in groups:
        assert set(before[g.root].tolist()) <= set(after[g.root].tolist())
        assert len(after[g.root]) == round(0.75 * g.channels)


@pytest.mark.parametrize("build, shape", [
    (lambda: CifarResNet(20, 3, 10), (3, 32, 32)),
    (lambda: LeNet(1, 28, 10, (6, 16), (120, 84), 5), (1, 28, 28)),
])
def test_the_cut_model_computes_what_the_masked_one_did(build, shape) -> None:
    """Fewer parameters and MACs, the same outputs (float32 rounding), and a fresh model
    cut to the saved shapes loads the weights and gives the same outputs again."""
    from trainables.models import macs_of

    torch.manual_seed(0)
    x = torch.randn(8, *shape)
    model = _warm(build(), x)
    dense_params = sum(p.numel() for p in model.parameters())
    dense_macs = macs_of(model, x[:1])
    groups, _ = _masked(model, x, 0.5)
    with torch.no_grad():
        expected = model(x)
    cut = copy.deepcopy(model)
    channels.lift_weight_parametrizations_(cut)
    channels.shrink_channels_(cut, channels.pruned_channels(model, groups), x[:1])
    with torch.no_grad():
        torch.testing.assert_close(cut(x), expected, rtol=0, atol=1e-5)
    removed = 0
    for g in groups:
        layer = cut.get_submodule(g.root)
        assert layer.weight.shape[0] == g.channels - round(0.5 * g.channels)
        removed += round(0.5 * g.channels)
    assert sum(p.numel() for p in cut.parameters()) < dense_params
    assert macs_of(cut, x[:1]) < dense_macs
    fresh = build()
    channels.shrink_to_shapes_(fresh, {k: list(v.shape) for k, v in cut.state_dict().items()},
                               x[:1])
    fresh.load_state_dict(cut.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), expected, rtol=0, atol=1e-5)


def test_resnet20_at_half_its_channels_has_fewer_parameters_and_macs() -> None:
    """A channel-pruned ResNet-20 (half of every block's inner channels) runs; parameters
    and MACs fall by about a third (the inner convs are half the network)."""
    from trainables.models import macs_of

    x = torch.randn(2, 3, 32, 32)
    model = _warm(CifarResNet(20, 3, 10), x)
    dense = (sum(p.numel() for p in model.parameters()), macs_of(model, x[:1]))
    groups, _ = _masked(model, x, 0.5)
    channels.cut_pruned_channels_(model, groups, x[:1])
    cut = (sum(p.numel() for p in model.parameters()), macs_of(model, x[:1]))
    assert 0.45 < cut[0] / dense[0] < 0.6 and 0.45 < cut[1] / dense[1] < 0.6
    assert model(x).shape == (2, 10)


CHANNEL = ["prune.granularity=channel", "prune.schedule=polynomial",
           "prune.final_sparsity=0.5", "prune.end=0.6", "prune.frequency=2"]


@pytest.mark.parametrize("quant_mode", ["none", "qat", "ptq"])
def test_a_channel_pruned_trial_packs_the_smaller_model(tiny_root: Path, tmp_path: Path,
                                                        quant_mode: str) -> None:
    """The trial's model.qsw holds the cut model; rebuilt from the config and the file's
    shapes, it scores exactly what the trial reported for it."""
    from test_quant_stage import packed_accuracy

    from trainables.data import load_splits

    extra = [] if quant_mode == "none" else [f"quant.mode={quant_mode}", "quant.bits=8",
                                             "quant.per_channel=true"]
    cfg = tiny_config(tiny_root, *CHANNEL, *extra, "train.epochs=2")
    final = run_trial(cfg, LocalSession(checkpoint_dir=tmp_path / "ckpt"))[-1]
    assert final["channel_sparsity"] == pytest.approx((2 + 4 + 16) / (4 + 8 + 32))
    splits = load_splits(cfg.data, seed=0)
    shape = (splits.in_channels, splits.image_size, splits.num_classes)
    model = model_for_packed(cfg, shape, tmp_path / "ckpt" / "artifacts" / "model.qsw")
    assert [model.get_submodule(n).weight.shape[0]
            for n in ("features.0", "features.3", "classifier.net.1")] == [2, 4, 16]
    assert sum(p.numel() for p in model.parameters()) == final["params"]
    acc = packed_accuracy(cfg, tmp_path / "ckpt" / "artifacts" / "model.qsw")
    assert acc == final["test_acc_q" if quant_mode != "none" else "test_acc_shrunk"]
    # compression against the dense model as configured, not the cut architecture
    assert final["fp32_bytes"] > 2 * final["params"] * 4
    assert final["compression_ratio"] == final["fp32_bytes"] / final["packed_bytes"] > 1.8
    if quant_mode == "none":  # the cut model computes what the masked one did (up to
        # float32 rounding, which may flip a near-tie: one tiny test image is 1/64)
        assert final["test_acc_shrunk"] == pytest.approx(final["test_acc"], abs=1 / 64)


def test_pruned_channels_stay_zero_through_training_and_resume(tiny_root: Path,
                                                               tmp_path: Path) -> None:
    """SGD with momentum and weight decay: the pruned rows, their biases and their optimizer
    state are exactly 0 at the end; a run resumed mid-schedule equals the uninterrupted."""
    cfg = tiny_config(tiny_root, *CHANNEL, "model.batch_norm=true", "train.epochs=3")
    full = run_trial(cfg, LocalSession(checkpoint_dir=tmp_path / "ckpt"))
    state = load_state_file(tmp_path / "ckpt")
    weights = state["model"]
    for layer in ("features.0", "features.4"):
        mask = weights[f"{layer}.parametrizations.weight.0.mask"]
        rows = ~mask.reshape(mask.shape[0], -1).any(1)
        assert int(rows.sum()) == round(0.5 * mask.shape[0])
        assert bool((weights[f"{layer}.parametrizations.weight.original"][rows] == 0).all())
        norm = layer.replace(".0", ".1").replace(".4", ".5")
        assert bool((weights[f"{norm}.weight"][rows] == 0).all())
        assert bool((weights[f"{norm}.bias"][rows] == 0).all())
    assert_resumes_exactly(cfg, tmp_path / "resume", full)


@pytest.mark.parametrize("overrides, says", [
    (["prune.granularity=channel", "prune.scope=global"],
     "prune.scope=global is invalid with prune.granularity=channel: allowed layer"),
    (["prune.granularity=block"], "prune.granularity='block' is invalid: allowed one of "
                                  "element, channel"),
])
def test_bad_channel_settings_name_the_field(overrides: list[str], says: str) -> None:
    with pytest.raises(ConfigError) as error:
        TrialConfig().with_overrides(overrides)
    assert says in str(error.value)


def test_removing_every_channel_of_a_layer_is_refused() -> None:
    from trainables.stages.prune import check_prunable

    cfg = TrialConfig().with_overrides(["prune.granularity=channel",
                                        "prune.schedule=constant", "prune.final_sparsity=0.95"])
    model = LeNet(1, 28, 10, (6, 16), (120, 84), 5)
    with pytest.raises(ConfigError) as error:
        check_prunable(cfg.prune, model, torch.zeros(1, 1, 28, 28))
    assert "prune.final_sparsity=0.95 is invalid with prune.granularity=channel: it " \
           "removes all 6 output channels of features.0; allowed a value that keeps one " \
           "(round(final_sparsity x 6) < 6)" in str(error.value)



def test_resume_from_initial_weights_holds_the_checkpoints_channels(tiny_root: Path,
                                                                    tmp_path: Path) -> None:
    """Fine-tuning trained weights (train.init_from) with channels pruned from the first
    step: a resumed run holds the checkpoint's pruned channels at 0, not the ones its
    prepare chose from the fresh init, and ends as the uninterrupted run does."""
    pre = tiny_config(tiny_root, "model.batch_norm=true", "train.epochs=1", "train.seed=7")
    run_trial(pre, LocalSession(checkpoint_dir=tmp_path / "pre"))
    cfg = tiny_config(tiny_root, "model.batch_norm=true", "train.epochs=3",
                      f"train.init_from={tmp_path / 'pre'}", "prune.granularity=channel",
                      "prune.schedule=constant", "prune.final_sparsity=0.5")
    full = run_trial(cfg, LocalSession())
    assert_resumes_exactly(cfg, tmp_path / "resume", full)


def test_the_cut_qat_model_quantizes_as_the_masked_one_did(tiny_root: Path) -> None:
    """Per-channel INT4 QAT: the consumers' columns of pruned channels are held at 0, so
    cutting them leaves every row's min-max range, and the converted cut model gives the
    masked QAT model's logits."""
    import quant
    from trainables.stages import build_pipeline
    from trainables.stages.base import TrainingPlan

    torch.manual_seed(0)
    cfg = tiny_config(tiny_root, "prune.granularity=channel", "prune.schedule=constant",
                      "prune.final_sparsity=0.5", "quant.mode=qat", "quant.bits=4",
                      "quant.per_channel=true", "model.channels=[6,16]", "model.hidden=[32]")
    model = LeNet(1, 28, 10, (6, 16), (32,), 3)
    pipeline = build_pipeline(cfg)
    pipeline.plan(TrainingPlan(1, 1, (1, 28, 10)))
    model = pipeline.prepare(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    for step in range(1, 4):  # a few steps: the columns move, then are held at 0 again
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        pipeline.after_step(step, model, optimizer)
    prune = next(s for s in pipeline if s.name == "prune")
    model.eval()
    with torch.no_grad():
        expected = model(x)
    cut = copy.deepcopy(model)
    _, lifted = channels.cut_pruned_channels_(cut, prune.groups, x[:1])
    channels.restore_weight_parametrizations_(cut, lifted)
    converted = quant.convert_(cut).eval()
    with torch.no_grad():
        torch.testing.assert_close(converted(x), expected, rtol=0, atol=1e-5)


def test_a_model_with_no_channel_prunable_alone_is_refused() -> None:
    """One Linear: its outputs are the model's; nothing can lose channels."""
    from trainables.stages.prune import check_prunable

    cfg = TrialConfig().with_overrides(["prune.granularity=channel",
                                        "prune.schedule=constant"])
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
    with pytest.raises(ConfigError) as error:
        check_prunable(cfg.prune, model, torch.zeros(1, 1, 28, 28))
    assert "prune.granularity=channel is invalid for this model: no layer's channels can " \
           "be pruned alone (1: its outputs are the model's outputs); allowed element" in \
        str(error.value)
