"""Optimizers as ``torch.optim`` classes, built by name; importable without Ray or MLflow.

Additive: ``gd``, ``sgd`` (:class:`SGD`, torch's), :class:`GDSign` (``gd_sign``, signs
frozen), :class:`AdamGD` (``adam_gd``).
Multiplicative: :class:`EG` (``eg``), :class:`EGPM` (``egpm``), :class:`AdamEG`
(``adam_eg``), :class:`Madam` (``madam``), :class:`LNSMadam` (``lns_madam``).
Every one of them skips and counts non-finite gradient elements (:mod:`optim.base`).

Example::

    import optim
    opt = optim.EG(optim.split_params(model, bias_lr=0.05), lr=2.0)
    opt = optim.build_for_model("madam", model, bias_lr=0.01, lr=0.01)
"""

from optim.adam_eg import AdamEG
from optim.adam_gd import AdamGD
from optim.base import Optimizer
from optim.eg import EG
from optim.egpm import EGPM
from optim.gd_sign import GDSign
from optim.groups import split_params
from optim.lns_madam import LNSMadam
from optim.madam import Madam
from optim.registry import (
    BIAS_MODES,
    available,
    build,
    build_for_model,
    defaults,
    needs_bias_group,
    readers,
    reads,
    register,
    validate,
)
from optim.sgd import SGD

__all__ = ["Optimizer", "SGD", "GDSign", "EG", "EGPM", "AdamEG", "AdamGD", "Madam",
           "LNSMadam", "split_params", "available", "build", "build_for_model",
           "needs_bias_group", "register", "reads", "readers", "defaults", "validate",
           "BIAS_MODES"]
