"""Optimizers as ``torch.optim`` classes, built by name; importable without Ray or MLflow.

Additive: ``gd``, ``sgd`` (torch's SGD), :class:`AdamGD` (``adam_gd``).
Multiplicative: :class:`EG` (``eg``), :class:`EGPM` (``egpm``), :class:`AdamEG`
(``adam_eg``), :class:`Madam` (``madam``), :class:`LNSMadam` (``lns_madam``).

Example::

    import optim
    opt = optim.EG(optim.split_params(model, bias_lr=0.05), lr=2.0)
    opt = optim.build_for_model("madam", model, bias_lr=0.01, lr=0.01)
"""

from optim.adam_eg import AdamEG
from optim.adam_gd import AdamGD
from optim.eg import EG
from optim.egpm import EGPM
from optim.groups import split_params
from optim.lns_madam import LNSMadam
from optim.madam import Madam
from optim.registry import (
    available,
    build,
    build_for_model,
    defaults,
    is_multiplicative,
    readers,
    reads,
    register,
    validate,
)

__all__ = ["EG", "EGPM", "AdamEG", "AdamGD", "Madam", "LNSMadam", "split_params",
           "available", "build", "build_for_model", "is_multiplicative", "register",
           "reads", "readers", "defaults", "validate"]
