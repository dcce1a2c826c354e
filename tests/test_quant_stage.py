"""Quantization inside the trial: QAT trains through fake-quantized weights and resumes
exactly; PTQ and QAT evaluate the quantized model and write it packed, and the packed
file alone reproduces the evaluated accuracy."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import tiny_config

from trainables.config import ConfigError, TrialConfig
from trainables.data import load_splits
from trainables.loop import run_trial
from trainables.models import model_for_packed
from trainables.sessions import LocalSession, load_state_file

TIMINGS = {"epoch_seconds", "train_seconds", "images_per_s"}


def tiny(root: Path, *overrides: str) -> TrialConfig:
    return tiny_config(root, "train.epochs=2", *overrides)


def assert_resumes_exactly(cfg: TrialConfig, tmp_path: Path, full: list[dict]) -> None:
    """Stopped after its first epoch and resumed from the checkpoint, the trial reports
    what the uninterrupted run ``full`` did (timings aside)."""
    crashed = LocalSession(checkpoint_dir=tmp_path / "ckpt", stop_after=1)
    with pytest.raises(InterruptedError):
        run_trial(cfg, crashed)
    resumed = run_trial(cfg, LocalSession(resume_from=tmp_path / "ckpt"))
    assert [{k: v for k, v in m.items() if k not in TIMINGS} for m in resumed] == \
        [{k: v for k, v in m.items() if k not in TIMINGS} for m in full]


@torch.no_grad()
def packed_accuracy(cfg: TrialConfig, path: Path) -> float:
    """Accuracy of the model rebuilt from the config (cut to the file's shapes where
    channels were pruned) and loaded from the packed file."""
    splits = load_splits(cfg.data, seed=cfg.train.seed)
    model = model_for_packed(cfg, (splits.in_channels, splits.image_size,
                                   splits.num_classes), path)
    correct = total = 0
    for x, y in splits.loader("test", 1000, torch.device("cpu"), seed=0):
        correct += (model(x).argmax(1) == y).sum().item()
        total += len(y)
    return correct / total


@pytest.mark.parametrize("mode", ["ptq", "qat"])
@pytest.mark.parametrize("fmt", [["quant.format=int", "quant.bits=4", "quant.per_channel=true"],
                                 ["quant.format=lns", "quant.bits=4"],
                                 ["quant.format=lns", "quant.bits=4", "quant.per_channel=true"],
                                 ["quant.format=codebook", "quant.k=4"]],
                         ids=["int4", "lns4", "lns4-pc", "k4"])
def test_the_packed_file_reproduces_the_evaluated_accuracy(tiny_root: Path, tmp_path: Path,
                                                           mode: str, fmt: list[str]) -> None:
    cfg = tiny(tiny_root, f"quant.mode={mode}", *fmt)
    history = run_trial(cfg, LocalSession(checkpoint_dir=tmp_path / "ckpt"))
    final = history[-1]
    artifacts = tmp_path / "ckpt" / "artifacts"
    assert final["packed_bytes"] == (artifacts / "model.qsw").stat().st_size
    assert final["compression_ratio"] == final["fp32_bytes"] / final["packed_bytes"] > 4
    assert packed_accuracy(cfg, artifacts / "model.qsw") == final["test_acc_q"]
    report = json.loads((artifacts / "quant.json").read_text())
    confusion = torch.tensor(report["confusion"])
    assert confusion.trace().item() / confusion.sum().item() == final["test_acc_q"]
    assert final["efficiency_score"] == pytest.approx(
        final["compression_ratio"] * (final["test_acc_q"] - 0.1) / 0.9)
    for png in ("weights_q.png", "confusion_q.png"):
        assert (artifacts / png).read_bytes()[:4] == b"\x89PNG"
    if mode == "qat":  # the trained forward pass already was the quantized model
        assert final["test_loss_q"] == final["test_loss"]
        assert final["test_acc_q"] == final["test_acc"]
    for m in history:  # every epoch: the quantized copy, for searches to rank by
        assert m["packed_bytes"] == final["packed_bytes"]
        assert m["budget_score"] == m["test_acc_q"]  # no budget: the accuracy


def test_the_budget_score_pays_for_overshoot(tiny_root: Path) -> None:
    base = tiny(tiny_root, "quant.mode=ptq", "quant.bits=8", "data.val_fraction=0.25",
                "train.epochs=1")
    size = run_trial(base, LocalSession())[-1]["packed_bytes"]
    final = run_trial(base.replace({"quant.byte_budget": size // 2}), LocalSession())[-1]
    assert final["budget_score"] == pytest.approx(final["val_acc_q"] - (size / (size // 2) - 1))
    within = run_trial(base.replace({"quant.byte_budget": size}), LocalSession())[-1]
    assert within["budget_score"] == within["val_acc_q"]


def test_qat_trains_differently_from_fp32_and_resumes_exactly(tiny_root: Path,
                                                              tmp_path: Path) -> None:
    cfg = tiny(tiny_root, "quant.mode=qat", "quant.bits=2", "train.epochs=3")
    plain = run_trial(tiny(tiny_root, "train.epochs=3"), LocalSession())
    full = run_trial(cfg, LocalSession())
    assert full[0]["train_loss"] != plain[0]["train_loss"]
    assert_resumes_exactly(cfg, tmp_path, full)


@pytest.mark.parametrize("extra", [["optim.name=lns_madam", "optim.lr=0.125",
                                    "quant.format=lns", "quant.bits=8", "quant.lns_frac_bits=3"],
                                   ["optim.name=eg", "optim.lr=2.0", "optim.bias_lr=0.02"],
                                   ["precision.mode=amp_bf16", "model.name=mlp",
                                    "model.widths=[32]"]],
                         ids=["lns_madam-lns8", "eg-int4", "amp_bf16"])
def test_qat_with_other_optimizers_and_precisions(tiny_root: Path, extra: list[str]) -> None:
    history = run_trial(tiny(tiny_root, "quant.mode=qat", "quant.bits=4", *extra),
                        LocalSession())
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert history[-1]["test_acc_q"] > 0.3


@pytest.mark.parametrize("override, fragments", [
    ("quant.bits=17", ["quant.bits", "2..16"]),
    ("quant.mode=int8", ["quant.mode", "ptq", "qat"]),
    ("quant.format=posit", ["quant.format", "codebook"]),
    (("quant.format=codebook", "quant.k=1"), ["quant.k", "2..256"]),
    (("quant.format=lns", "quant.lns_frac_bits=11"), ["quant.lns_frac_bits", "0..10"]),
    ("quant.first_last_bits=1", ["quant.first_last_bits", "2..16"]),
])
def test_bad_quant_fields_name_the_field(override, fragments: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        TrialConfig().with_overrides([override] if isinstance(override, str) else override)
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)


def test_weight_rounding_of_a_qat_model_rounds_its_float_weights(tiny_root: Path) -> None:
    final = run_trial(tiny(tiny_root, "quant.mode=qat", "quant.bits=4", "train.epochs=1",
                           "evaluate.weight_rounding=[int8]"), LocalSession())[-1]
    assert 0 <= final["test_acc_int8"] <= 1


def test_first_last_bits_needs_a_bit_width_format() -> None:
    with pytest.raises(ConfigError, match="quant.first_last_bits=8.*int or lns"):
        TrialConfig().with_overrides(["quant.format=codebook", "quant.first_last_bits=8"])


def test_an_extra_test_set_is_scored_float_and_quantized(tiny_root: Path) -> None:
    # The tiny EMNIST-like images written as a folder of digit classes, read as grayscale.
    from conftest import write_image_folder

    folder = tiny_root / "extra-digits"
    if not folder.exists():
        write_image_folder(folder, 10, (28, 28), seed=11, n_train=30, n_test=1)
    history = run_trial(tiny(tiny_root, "quant.mode=ptq", "quant.bits=8",
                             f"data.extra_test={folder / 'train'}"), LocalSession())
    assert all(0 <= m["extra_acc"] <= 1 for m in history)
    assert 0 <= history[-1]["extra_acc_q"] <= 1
    with pytest.raises(Exception, match="does not exist"):
        run_trial(tiny(tiny_root, "data.extra_test=nowhere", "train.epochs=1"), LocalSession())


def test_qat_after_a_float_warm_up_resumes_exactly(tiny_root: Path, tmp_path: Path) -> None:
    cfg = tiny(tiny_root, "quant.mode=qat", "quant.bits=2", "quant.qat_start_epoch=1",
               "train.epochs=3")
    full = run_trial(cfg, LocalSession())
    float_first = run_trial(tiny(tiny_root, "train.epochs=3"), LocalSession())
    qat_now = run_trial(tiny(tiny_root, "quant.mode=qat", "quant.bits=2", "train.epochs=3"),
                        LocalSession())
    # Epoch 1 trains in float (as plain FP32 does), then 2-bit QAT takes over.
    assert full[0]["train_loss"] == float_first[0]["train_loss"]
    assert full[0]["train_loss"] != qat_now[0]["train_loss"]
    assert full[1]["train_loss"] != float_first[1]["train_loss"]
    assert full[-1]["test_acc_q"] == full[-1]["test_acc"]
    assert_resumes_exactly(cfg, tmp_path, full)
    with pytest.raises(ConfigError, match="quant.qat_start_epoch=3.*< train.epochs"):
        tiny(tiny_root, "quant.mode=qat", "quant.qat_start_epoch=3")


@pytest.mark.parametrize("mode", ["ptq", "qat"])
def test_a_diverged_trial_reports_nan_instead_of_failing(tiny_root: Path, mode: str) -> None:
    """EG at an absurd lr drives weights to inf: the trial still ends, its post-training
    metrics are NaN and its files say why (LNS encoding raised on inf before)."""
    from trainables.loop import run_trial
    from trainables.sessions import LocalSession

    cfg = tiny_config(tiny_root, "optim.name=eg", "optim.lr=1e4", "optim.weight_decay=0",
                      "train.epochs=2", f"quant.mode={mode}", "quant.format=lns",
                      "quant.bits=8", "evaluate.weight_rounding=[lns8,int4]")
    history = run_trial(cfg, LocalSession())
    last = history[-1]
    assert not math.isfinite(last["train_loss"])
    for key in ("test_acc_q", "test_acc_lns8", "test_acc_int4"):
        assert math.isnan(last[key]), key


ALL_LNS = ["optim.name=lns_madam", "optim.lr=0.125", "quant.mode=qat", "quant.format=lns",
           "quant.bits=8", "quant.lns_frac_bits=3", "quant.activation_bits=8",
           "quant.activation_format=lns", "quant.gradient_bits=8"]


def test_all_in_lns_trains_packs_and_resumes_exactly(tiny_root: Path, tmp_path: Path) -> None:
    """LNS-Madam's setting: LNS-8 weights (its optimizer's own grid), LNS-8 layer inputs
    forward and LNS-8 gradients backward."""
    cfg = tiny(tiny_root, *ALL_LNS, "train.epochs=3")
    full = run_trial(cfg, LocalSession(checkpoint_dir=tmp_path / "full"))
    no_rounding = run_trial(tiny(tiny_root, *ALL_LNS[:-1], "train.epochs=3"), LocalSession())
    assert full[0]["train_loss"] != no_rounding[0]["train_loss"]  # gradients rounded
    assert full[-1]["train_loss"] < full[0]["train_loss"]
    assert full[-1]["test_acc_q"] > 0.3
    packed = tmp_path / "full" / "artifacts" / "model.qsw"
    assert packed_accuracy(cfg, packed) == full[-1]["test_acc_q"]  # LNS inputs packed too
    assert_resumes_exactly(cfg, tmp_path, full)


def test_qat_fine_tunes_from_a_trained_fp32_checkpoint(tiny_root: Path, tmp_path: Path) -> None:
    """train.init_from: QAT starts from the FP32 trial's final weights (the usual QAT
    recipe), not from the seeded initialization."""
    fp32 = tiny(tiny_root)
    fp32_history = run_trial(fp32, LocalSession(checkpoint_dir=tmp_path / "fp32"))
    trained = load_state_file(tmp_path / "fp32")["model"]
    # Zero epochs of fine-tuning are not allowed, so look at what the model starts from:
    # PTQ of the loaded weights with lr 0 equals PTQ at the end of the FP32 trial.
    frozen = fp32.with_overrides([f"train.init_from={tmp_path / 'fp32'}", "train.epochs=1",
                                  "quant.mode=ptq", "quant.format=int", "quant.bits=8",
                                  "optim.lr=1e-30", "optim.schedule=constant"])
    start = run_trial(frozen, LocalSession(checkpoint_dir=tmp_path / "frozen"))[-1]
    assert start["test_acc"] == fp32_history[-1]["test_acc"]
    assert start["test_loss"] == pytest.approx(fp32_history[-1]["test_loss"], rel=1e-6)
    qat = fp32.with_overrides([f"train.init_from={tmp_path / 'fp32' / 'state.pt'}",
                               "train.epochs=1", "quant.mode=qat", "quant.format=int",
                               "quant.bits=4", "quant.per_channel=true", "optim.lr=0.005"])
    session = LocalSession(checkpoint_dir=tmp_path / "qat")
    tuned = run_trial(qat, session)[-1]
    scratch = run_trial(qat.with_overrides(["train.init_from="]), LocalSession())[-1]
    # One epoch at a small lr from the trained weights stays near them, and ahead of one
    # epoch from scratch (the tiny data's FP32 trial is far from chance).
    assert tuned["test_acc_q"] >= fp32_history[-1]["test_acc"] - 0.1
    assert tuned["train_loss"] < scratch["train_loss"]
    w = load_state_file(tmp_path / "qat")["model"]["features.0.parametrizations.weight.original"]
    assert (w - trained["features.0.weight"]).abs().max() < 0.05  # moved a little, from there


@pytest.mark.parametrize("case, fragment", [
    ("missing", "allowed a checkpoint folder holding state.pt, or such a file"),
    ("garbage", "is not a readable checkpoint"),
    ("other_model", "its weights are not this model's (other shapes: classifier.net.1.weight"),
])
def test_init_from_a_bad_checkpoint_names_the_field(tiny_root: Path, tmp_path: Path,
                                                    case: str, fragment: str) -> None:
    source = tmp_path / "source"
    if case == "garbage":
        source.mkdir()
        (source / "state.pt").write_bytes(b"not a checkpoint")
    elif case == "other_model":
        run_trial(tiny(tiny_root, "train.epochs=1", "model.hidden=[16]"),
                  LocalSession(checkpoint_dir=source))
    cfg = tiny(tiny_root, f"train.init_from={source}", "train.epochs=1")
    with pytest.raises(ConfigError, match="train.init_from=") as error:
        run_trial(cfg, LocalSession())
    assert fragment in str(error.value), str(error.value)


def test_a_resumed_trial_does_not_need_its_init_from_any_more(tiny_root: Path,
                                                               tmp_path: Path) -> None:
    """Its own checkpoint replaces the initial weights: a Tune restart or --resume after
    the source checkpoint was removed goes on (before: a ConfigError)."""
    run_trial(tiny(tiny_root, "train.epochs=1"), LocalSession(checkpoint_dir=tmp_path / "src"))
    cfg = tiny(tiny_root, f"train.init_from={tmp_path / 'src'}", "quant.mode=qat")
    full = run_trial(cfg, LocalSession())
    (tmp_path / "src" / "state.pt").unlink()
    with pytest.raises(ConfigError, match="train.init_from"):
        run_trial(cfg, LocalSession())
    run_trial(tiny(tiny_root, "train.epochs=1"), LocalSession(checkpoint_dir=tmp_path / "src"))
    crashed = LocalSession(checkpoint_dir=tmp_path / "ckpt", stop_after=1)
    with pytest.raises(InterruptedError):
        run_trial(cfg, crashed)
    (tmp_path / "src" / "state.pt").unlink()
    resumed = run_trial(cfg, LocalSession(resume_from=tmp_path / "ckpt"))
    assert [m["train_loss"] for m in resumed] == [m["train_loss"] for m in full]


def test_init_from_an_mlflow_run_fetches_its_checkpoint(tiny_root: Path, tmp_path: Path) -> None:
    """train.init_from=runs:/RUN_ID: the run's logged checkpoint (what the sweep callback
    logs as checkpoint/state.pt), downloaded once into the sweep's storage."""
    from sweeps.init_weights import resolve_run_checkpoints
    from sweeps.spec import Sweep
    from sweeps.tracking import SweepTracker

    fp32 = tiny(tiny_root, "train.epochs=1")
    run_trial(fp32, LocalSession(checkpoint_dir=tmp_path / "ckpt"))
    tracker = SweepTracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "fp32")
    trial_run = tracker.start_sweep("an fp32 trial")
    tracker.log_artifact(trial_run, tmp_path / "ckpt" / "state.pt", "checkpoint")
    empty_run = tracker.start_sweep("a run without a checkpoint")
    qat = fp32.with_overrides([f"train.init_from=runs:/{trial_run}", "quant.mode=qat"])
    sweep = Sweep(name="qat", base=qat, points=({"optim.lr": 0.01},
                                                {"train.init_from": f"runs:/{trial_run}"}),
                  storage_path=str(tmp_path / "results"), tracking_uri=tracker.tracking_uri)
    sweep, base = resolve_run_checkpoints(sweep, qat, tracker)
    folder = tmp_path / "results" / "init_from" / trial_run
    assert base.train.init_from == str(folder) and (folder / "state.pt").is_file()
    assert sweep.points[1]["train.init_from"] == str(folder)
    assert torch.equal(load_state_file(folder)["model"]["features.0.weight"],
                       load_state_file(tmp_path / "ckpt")["model"]["features.0.weight"])
    assert run_trial(base, LocalSession())[-1]["train_loss"] < \
        run_trial(qat.with_overrides(["train.init_from="]), LocalSession())[-1]["train_loss"]
    with pytest.raises(ConfigError, match="allowed runs:/RUN_ID"):
        odd = fp32.with_overrides(["train.init_from=runs:/../elsewhere"])
        resolve_run_checkpoints(Sweep(name="x", base=odd, points=({},)), odd, tracker)
    bad = fp32.with_overrides([f"train.init_from=runs:/{empty_run}"])
    with pytest.raises(ConfigError, match=f"train.init_from='runs:/{empty_run}' is invalid: "
                                          f"run {empty_run} of sqlite:.* has no checkpoint"):
        resolve_run_checkpoints(Sweep(name="x", base=bad, points=({},),
                                      storage_path=str(tmp_path / "results")), bad, tracker)


def test_bitops_are_macs_times_weight_and_input_bits() -> None:
    """Hand count: Linear 4->3 (12 MACs) at 4-bit weights, Linear 3->2 (6 MACs) left in
    float by an override; inputs 8-bit where quantized, 32 otherwise."""
    import quant
    from trainables.stages.quant import bitops_of

    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    config = quant.QuantConfig(weights=quant.IntFormat(4), overrides=(("2", None),),
                               activations=quant.IntFormat(8, symmetric=False))
    assert bitops_of(model, config, torch.zeros(1, 4)) == 12 * 4 * 8 + 6 * 32 * 32
    float_inputs = quant.QuantConfig(weights=quant.IntFormat(8))
    assert bitops_of(model, float_inputs, torch.zeros(1, 4)) == (12 + 6) * 8 * 32
