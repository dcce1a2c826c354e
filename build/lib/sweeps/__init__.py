"""Sweep scripts (one per research question) and the shared Tune + Optuna + MLflow runner.

Each script runs locally (``python sweeps/baseline.py``, embedded Ray) or on a cluster
(``ray submit cluster/gpu.yaml sweeps/baseline.py``); it imports this package by name,
so the project must be installed on every node.
"""

__all__: list[str] = []
