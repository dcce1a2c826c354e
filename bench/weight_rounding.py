"""Which optimizer's weights survive log-domain rounding? Test accuracy of finished
trials as trained (fp32) and with every linear/conv weight tensor rounded to LNS-8 and
LNS-4 (weight-only PTQ, per-tensor scale = max|w|), grouped by dataset/model/optimizer,
mean +- std over the trials of each group (the seed re-runs of an eg_vs_gd study).

    QSWEEP_DATA=../shared/data python bench/weight_rounding.py ray_results/eg_vs_gd-*-seeds
"""

from __future__ import annotations

import argparse
import statistics
from collections import defaultdict
from pathlib import Path

from _util import finish, header


def latest_checkpoints(run_dir: Path) -> list[Path]:
    """The last checkpoint folder of every trial under a Tune run folder."""
    found = []
    for trial in sorted(p for p in run_dir.iterdir() if p.is_dir()):
        checkpoints = sorted(trial.glob("checkpoint_*"))
        if checkpoints:
            found.append(checkpoints[-1])
    return found


def main() -> None:
    from trainables.config import TrialConfig
    from trainables.evaluate import LNS_PTQ_FORMATS, weight_rounding_accuracy
    from trainables.sessions import load_state_file

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", type=Path, help="Tune run folders")
    args = parser.parse_args()
    env = header("weight_rounding")
    groups: dict[tuple[str, str, str], list[dict[str, float]]] = defaultdict(list)
    for run_dir in args.run_dirs:
        for checkpoint in latest_checkpoints(run_dir):
            state = load_state_file(checkpoint)
            cfg = TrialConfig.from_dict(state["config"])
            key = (cfg.data.name, cfg.model.name, cfg.optim.name)
            groups[key].append(weight_rounding_accuracy(cfg, state["model"], LNS_PTQ_FORMATS))
    names = ["fp32", *LNS_PTQ_FORMATS]
    print("| dataset | model | optimizer | n | " + " | ".join(names) +
          " | lns4 drop (points) |")
    print("|---|---|---|---|" + "---|" * (len(names) + 1))
    results = {}
    for key, accs in groups.items():
        cells = []
        for name in names:
            values = [100 * a[name] for a in accs]
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.fmean(values):.2f} +- {std:.2f}")
        drop = statistics.fmean(100 * (a["fp32"] - a["lns4"]) for a in accs)
        print(f"| {' | '.join(key)} | {len(accs)} | {' | '.join(cells)} | {drop:.2f} |")
        results["/".join(key)] = {n: statistics.fmean(a[n] for a in accs) for n in names}
    finish(env, {"groups": results})


if __name__ == "__main__":
    main()
