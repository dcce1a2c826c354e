"""The ``qsweep`` command (installed by ``pip install -e .``): one entry point to the
scripts, each of which also runs on its own (``python -m sweeps.train``,
``python sweeps/eg_vs_gd.py``: ``ray submit`` uploads one file).

    qsweep train --set quant.mode=qat --set quant.bits=4     # one tracked trial
    qsweep sweep eg_vs_gd --smoke-test                        # a sweep script by name
    qsweep report eg_vs_gd                                    # a sweep's table from MLflow
    qsweep rerun RUN_ID                                       # a trial again, from its run
    qsweep ui                                                 # the MLflow UI on ./mlflow.db
"""

from __future__ import annotations

import importlib
import runpy
import sys
from pathlib import Path

__all__ = ["main", "COMMANDS", "SWEEPS"]

# command -> (module, what it does)
COMMANDS = {
    "train": ("sweeps.train", "one tracked trial, no search"),
    "sweep": ("", "run a sweep script: qsweep sweep NAME [its flags]"),
    "report": ("sweeps.report", "a sweep's or study's table and plot, from MLflow alone"),
    "rerun": ("sweeps.rerun", "re-run a trial from its MLflow run id, in this process"),
    "ui": ("sweeps.ui", "the MLflow UI on a store (one worker, 127.0.0.1)"),
    "cluster-check": ("sweeps.cluster_check", "validate Ray cluster launcher YAML files"),
}
# The sweep scripts (sweeps/NAME.py), each with its own --help.
SWEEPS = {
    "eg_vs_gd": "the EG-vs-GD study (8 optimizers x datasets x models, seeds)",
    "baseline": "FP32 LeNet on MNIST: lr and weight decay by TPE + ASHA",
    "quant_bits": "bit-width search: accuracy vs packed bytes (NSGA-II Pareto front)",
    "prune_quant": "sparsity schedule x bit width: accuracy vs packed bytes (Pareto front)",
    "lc_mix": "LC compression per layer type: test error vs compression (Pareto front)",
    "deploy_study": "seed 002: FP32/FP16/BF16/INT16/INT8 (PTQ, QAT) deployed: accuracy, speed",
}
_HERE = Path(__file__).resolve().parent


def _usage() -> str:
    lines = [__doc__.strip(), "", "commands:"]
    lines += [f"  {name:<14} {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "sweeps (qsweep sweep NAME --help):"]
    lines += [f"  {name:<14} {text}" for name, text in SWEEPS.items()]
    return "\n".join(lines)


def _run_script(module: str, path: Path, argv: list[str]) -> int:
    """Run a script as ``python PATH ARGS`` would (its resume hints name that command)."""
    sys.argv = [str(path), *argv]
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as done:
        return done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"error: qsweep {command!r} is invalid: allowed one of "
              f"{', '.join(COMMANDS)} (qsweep --help)", file=sys.stderr)
        return 2
    if command == "sweep":
        if not rest or rest[0] in ("-h", "--help"):
            print(_usage())
            return 0 if rest else 2
        name = rest[0]
        if name not in SWEEPS:
            print(f"error: sweep {name!r} is invalid: allowed one of {', '.join(SWEEPS)}",
                  file=sys.stderr)
            return 2
        return _run_script(f"sweeps.{name}", _HERE / f"{name}.py", rest[1:])
    module = COMMANDS[command][0]
    if command == "train":  # main_guard turns bad input into one line and exit 2
        return _run_script(module, _HERE / "train.py", rest)
    return importlib.import_module(module).main(rest)


if __name__ == "__main__":
    sys.exit(main())
