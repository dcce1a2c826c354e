"""Weight-rounding evaluation: float accuracy equals the trial's own test accuracy."""

from __future__ import annotations

from pathlib import Path

import torch
from test_loop import tiny

from quant import LNSFormat
from trainables.evaluate import LNS_PTQ_FORMATS, weight_rounding_accuracy
from trainables.loop import run_trial
from trainables.sessions import LocalSession, load_state_file


def test_fp32_matches_the_trial_and_rounding_is_applied(tiny_root: Path, tmp_path: Path):
    cfg = tiny(tiny_root, "train.epochs=2")
    history = run_trial(cfg, LocalSession(checkpoint_dir=tmp_path))
    state = load_state_file(tmp_path)
    accs = weight_rounding_accuracy(cfg, state["model"], {
        "same": lambda w: w, "zero": torch.zeros_like, **LNS_PTQ_FORMATS})
    assert accs["fp32"] == history[-1]["test_acc"] == accs["same"]
    assert accs["zero"] < accs["fp32"]  # all weights zero: every image gets one class
    assert 0.0 <= accs["lns4"] <= 1.0 and abs(accs["lns8"] - accs["fp32"]) < 0.1
    assert LNS_PTQ_FORMATS["lns4"].__self__ == LNSFormat(4, 0)
