"""Trial stages in the one loop: every hook runs where it should, stage state resumes
exactly, and the weight-rounding stage's metrics and file match an independent rounding
of the trained weights."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import tiny_config
from torch import nn

from quant.lns import LNSFormat
from quant.metrics import sqnr_db
from trainables.config import ConfigError, TrialConfig
from trainables.data import load_splits
from trainables.loop import run_trial
from trainables.models import build_model
from trainables.sessions import LocalSession, load_state_file
from trainables.stages import FinalizeContext, Stage

TIMINGS = {"epoch_seconds", "train_seconds", "images_per_s"}


def tiny(root: Path, *overrides: str) -> TrialConfig:
    return tiny_config(root, *overrides)


class L2Stage(Stage):
    """A stateful stage touching every hook: an L2 penalty whose weight grows per step,
    a step counter (state), a frozen first conv (prepare) and a file at the end."""

    name = "l2"

    def __init__(self, coef: float = 1e-3) -> None:
        self.coef, self.steps, self.prepared = coef, 0, False

    def prepare(self, model: nn.Module) -> nn.Module:
        self.prepared = True
        return model

    def penalty(self, model: nn.Module) -> torch.Tensor:
        weight = self.coef * (1 + self.steps / 100)
        return weight * sum(p.pow(2).sum() for p in model.parameters() if p.dim() >= 2)

    def metric_names(self) -> frozenset[str]:
        return frozenset({"l2_steps", "l2_test_acc", "l2_final_test_acc"})

    def after_step(self, step: int, model: nn.Module, optimizer) -> None:
        self.steps = step

    def epoch_end(self, ctx: FinalizeContext) -> dict[str, float]:
        return {"l2_steps": float(self.steps),
                "l2_test_acc": ctx.evaluate(ctx.model, "test")["test_acc"]}

    def finalize(self, ctx: FinalizeContext) -> dict[str, float]:
        (ctx.out_dir / "l2.txt").write_text(f"{self.steps}\n")
        return {"l2_final_test_acc": ctx.evaluate(ctx.model)["test_acc"]}

    def state_dict(self) -> dict:
        return {"steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.steps = state["steps"]


def without_timings(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in m.items() if k not in TIMINGS} for m in history]


def test_every_hook_runs_and_the_penalty_changes_training(tiny_root: Path,
                                                          tmp_path: Path) -> None:
    cfg = tiny(tiny_root)
    stage = L2Stage(coef=1e-2)
    session = LocalSession(checkpoint_dir=tmp_path / "ckpt")
    history = run_trial(cfg, session, stages=[stage])
    plain = run_trial(cfg, LocalSession())
    assert stage.prepared
    steps_per_epoch = math.ceil(320 / 32)
    assert [m["l2_steps"] for m in history] == [steps_per_epoch * e for e in (1, 2, 3)]
    # A stage's evaluation at the epoch's end is the loop's own evaluation.
    assert all(m["l2_test_acc"] == m["test_acc"] for m in history)
    assert history[0]["train_loss"] != plain[0]["train_loss"]  # the penalty was trained on
    assert "l2_final_test_acc" in history[-1] and "l2_final_test_acc" not in history[-2]
    # The stage's final evaluation of the untouched model equals the epoch's test_acc.
    assert history[-1]["l2_final_test_acc"] == history[-1]["test_acc"]
    assert session.reports[-1]["l2_final_test_acc"] == history[-1]["l2_final_test_acc"]
    assert (tmp_path / "ckpt" / "artifacts" / "l2.txt").read_text() == f"{3 * steps_per_epoch}\n"
    assert load_state_file(tmp_path / "ckpt")["stages"] == {"l2": {"steps": 3 * steps_per_epoch}}


def test_stage_state_resumes_exactly(tiny_root: Path, tmp_path: Path) -> None:
    cfg = tiny(tiny_root)
    uninterrupted = run_trial(cfg, LocalSession(), stages=[L2Stage()])
    crashed = LocalSession(checkpoint_dir=tmp_path / "ckpt", stop_after=1)
    with pytest.raises(InterruptedError):
        run_trial(cfg, crashed, stages=[L2Stage()])
    resumed = run_trial(cfg, LocalSession(resume_from=tmp_path / "ckpt"), stages=[L2Stage()])
    assert without_timings(resumed) == without_timings(uninterrupted)


def test_no_checkpoint_still_reports_the_final_files(tiny_root: Path, tmp_path: Path) -> None:
    cfg = tiny(tiny_root, "train.checkpoint=false", "train.epochs=1")
    session = LocalSession(checkpoint_dir=tmp_path / "ckpt")
    run_trial(cfg, session, stages=[L2Stage()])
    assert (tmp_path / "ckpt" / "artifacts" / "l2.txt").exists()
    assert load_state_file(tmp_path / "ckpt") is None  # files only, no training state


@torch.no_grad()
def _accuracy(model: nn.Module, cfg: TrialConfig) -> float:
    splits = load_splits(cfg.data, seed=cfg.train.seed)
    correct = total = 0
    model.eval()
    for x, y in splits.loader("test", 1000, torch.device("cpu"), seed=0):
        correct += (model(x).argmax(1) == y).sum().item()
        total += len(y)
    return correct / total


def test_weight_rounding_stage_matches_an_independent_rounding(tiny_root: Path,
                                                               tmp_path: Path) -> None:
    cfg = tiny(tiny_root, "evaluate.weight_rounding=[lns8, lns4, int8, int4]",
               "train.epochs=2")
    session = LocalSession(checkpoint_dir=tmp_path / "ckpt")
    history = run_trial(cfg, session)
    final = history[-1]
    state = load_state_file(tmp_path / "ckpt")
    splits = load_splits(cfg.data, seed=0)
    model = build_model(cfg.model, splits.in_channels, splits.image_size, splits.num_classes)
    model.load_state_dict(state["model"])
    assert _accuracy(model, cfg) == final["test_acc"]
    report = json.loads((tmp_path / "ckpt" / "artifacts" / "weight_rounding.json").read_text())
    # Independent oracles: the LNS grid's own rounding, torch's per-channel fake quant.
    def int_oracle(bits):
        def fake_quant(w):
            qmax = (1 << (bits - 1)) - 1
            observer = torch.ao.quantization.PerChannelMinMaxObserver(
                ch_axis=0, dtype=torch.qint8, qscheme=torch.per_channel_symmetric,
                quant_min=-qmax - 1, quant_max=qmax)
            observer(w)
            scale, zp = observer.calculate_qparams()
            return torch.fake_quantize_per_channel_affine(w, scale, zp.int(), 0, -qmax - 1,
                                                          qmax)
        return fake_quant

    oracles = (("lns8", LNSFormat(8, 3).fake_quantize), ("lns4", LNSFormat(4, 0).fake_quantize),
               ("int8", int_oracle(8)), ("int4", int_oracle(4)))
    for name, fake_quant in oracles:
        rounded = copy.deepcopy(model)
        for p in rounded.parameters():
            if p.dim() >= 2:
                p.data = fake_quant(p.data)
        assert final[f"test_acc_{name}"] == _accuracy(rounded, cfg)
        assert report[name]["test_acc"] == final[f"test_acc_{name}"]
        for key, w in model.named_parameters():
            if w.dim() >= 2:
                assert report[name]["sqnr_db"][key] == pytest.approx(
                    sqnr_db(w, fake_quant(w.detach())))
    # 8-bit log rounding keeps far more signal than 4-bit.
    assert min(v for v in report["lns8"]["sqnr_db"].values()) > \
        max(v for v in report["lns4"]["sqnr_db"].values())


def test_sqnr_by_hand() -> None:
    x = torch.tensor([3.0, 4.0])
    assert sqnr_db(x, torch.tensor([3.0, 3.0])) == pytest.approx(10 * math.log10(25 / 1))
    assert sqnr_db(x, x) == math.inf
    assert sqnr_db(torch.zeros(2), torch.ones(2)) == -math.inf


def test_unknown_rounding_format_names_the_field() -> None:
    with pytest.raises(ConfigError, match=r"evaluate.weight_rounding\[1\].*'int3'.*int4"):
        TrialConfig().with_overrides(["evaluate.weight_rounding=[lns4, int3]"])
