"""Name -> optimizer, so a config can say ``optim.name=eg``.

Each registered factory is the one source of truth for its optimizer's hyperparameters:
its keyword arguments are the names it reads (the config's ``optim.*`` field names), their
defaults are its defaults, and the optimizer class validates their values. :func:`build`
refuses any other keyword, naming it and what the optimizer takes; :func:`reads`,
:func:`defaults` and :func:`validate` let a config ask instead of repeating the rules.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn

from optim._common import check_bool, check_range
from optim.adam_eg import AdamEG
from optim.adam_gd import AdamGD
from optim.eg import EG
from optim.egpm import EGPM
from optim.gd_sign import GDSign
from optim.groups import split_params
from optim.lns_madam import LNSMadam
from optim.madam import Madam
from optim.sgd import SGD

__all__ = ["available", "build", "build_for_model", "register", "needs_bias_group", "reads",
           "defaults", "validate", "readers", "BIAS_MODES"]

Factory = Callable[..., torch.optim.Optimizer]
# How build_for_model groups a model's parameters for an optimizer that needs a bias
# group: "split" (weights take the optimizer's update, biases and norm parameters its
# additive step) or "all" (every parameter takes the optimizer's update, as seed 000 did).
BIAS_MODES = ("split", "all")


@dataclass(frozen=True)
class _Entry:
    factory: Factory
    # The flags of the group that biases and norm parameters need (they start at 0, which
    # a sign-preserving or multiplicative update never moves); None: no such group.
    bias_group: Mapping[str, Any] | None


_REGISTRY: dict[str, _Entry] = {}


def register(name: str, factory: Factory,
             bias_group: Mapping[str, Any] | None = None) -> None:
    """Make ``factory(params, **hparams)`` buildable as ``name``; ``bias_group``: the
    param-group flags under which the optimizer steps biases additively, if it needs that
    (e.g. ``{"multiplicative": False}``)."""
    if name in _REGISTRY:
        raise ValueError(f"optimizer {name!r} is already registered")
    _REGISTRY[name] = _Entry(factory, bias_group)


def available() -> tuple[str, ...]:
    return tuple(sorted(_REGISTRY))


def _entry(name: str) -> _Entry:
    if name not in _REGISTRY:
        raise ValueError(f"optimizer name={name!r} is invalid: allowed one of "
                         f"{', '.join(available())}")
    return _REGISTRY[name]


def needs_bias_group(name: str) -> bool:
    """Whether ``name``'s update never moves a weight at 0 (multiplicative or
    sign-preserving), so that :func:`build_for_model` gives biases an additive group."""
    return _entry(name).bias_group is not None


def reads(name: str) -> tuple[str, ...]:
    """The hyperparameters optimizer ``name`` takes (``lr`` first)."""
    return tuple(defaults(name))


def defaults(name: str) -> dict[str, Any]:
    """Hyperparameter -> default of optimizer ``name`` (``lr`` has none: ``None``)."""
    signature = inspect.signature(_entry(name).factory)
    return {p.name: (None if p.default is inspect.Parameter.empty else p.default)
            for p in list(signature.parameters.values())[1:]}


def readers(hparam: str) -> tuple[str, ...]:
    """The optimizers that take ``hparam``."""
    return tuple(n for n in available() if hparam in reads(n))


def build(name: str, params: Iterable[Any], **hparams: Any) -> torch.optim.Optimizer:
    """Construct the optimizer registered as ``name``; hyperparameters are validated by it,
    and a keyword it does not take raises ``ValueError`` naming it.

    Example::

        opt = build("gd", model.parameters(), lr=0.1)
    """
    known = reads(name)
    for key in hparams:
        if key not in known:
            raise ValueError(f"Invalid keyword {key!r} for optimizer {name!r}: it takes "
                             f"{', '.join(known)}")
    if "lr" not in hparams:
        raise ValueError(f"optimizer {name!r} needs lr")
    check_range("lr", hparams["lr"], 0.0, lo_open=True)
    check_range("weight_decay", hparams.get("weight_decay", 0.0), 0.0)
    return _entry(name).factory(params, **hparams)


def validate(name: str, **hparams: Any) -> None:
    """Raise ``ValueError`` (the optimizer's own message) unless ``build(name, ...,
    **hparams)`` would accept these hyperparameters. Builds it on a tiny tensor."""
    build(name, [nn.Parameter(torch.ones(2, 2))], **hparams)


def build_for_model(name: str, model: nn.Module, bias_lr: float | None = None,
                    bias_mode: str = "split", **hparams: Any) -> torch.optim.Optimizer:
    """Like :func:`build`; for an optimizer that needs a bias group
    (:func:`needs_bias_group`) and ``bias_mode="split"``, :func:`optim.split_params`
    groups (biases and norm parameters step additively at ``bias_lr``); ``"all"`` applies
    the optimizer to every parameter, biases included (seed 000's setting).

    Example::

        opt = build_for_model("eg", model, bias_lr=0.05, lr=2.0)
    """
    if bias_mode not in BIAS_MODES:
        raise ValueError(f"bias_mode={bias_mode!r} is invalid: allowed "
                         f"{', '.join(BIAS_MODES)}")
    bias_group = _entry(name).bias_group
    if bias_group is not None and bias_mode == "split":
        return build(name, split_params(model, bias_lr, bias_group), **hparams)
    return build(name, model.parameters(), **hparams)


def _gd(params: Iterable[Any], lr: float, weight_decay: float = 0.0
        ) -> torch.optim.Optimizer:
    # Plain gradient descent: SGD without momentum.
    return SGD(params, lr=lr, weight_decay=weight_decay)


def _gd_sign(params: Iterable[Any], lr: float, weight_decay: float = 0.0,
             sign_threshold: float = 1e-18) -> torch.optim.Optimizer:
    return GDSign(params, lr=lr, weight_decay=weight_decay, threshold=sign_threshold)


def _sgd(params: Iterable[Any], lr: float, weight_decay: float = 0.0, momentum: float = 0.9,
         nesterov: bool = True) -> torch.optim.Optimizer:
    # torch's SGD accepts momentum >= 1 (a diverging average) and words the Nesterov
    # condition its own way: check both here, in the optimizers' vocabulary.
    check_range("momentum", momentum, 0.0, 1.0, hi_open=True)
    check_bool("nesterov", nesterov)
    if nesterov and momentum == 0.0:
        raise ValueError("Invalid nesterov: True (allowed only with momentum > 0)")
    return SGD(params, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)


def _eg(params: Iterable[Any], lr: float, weight_decay: float = 0.0, momentum: float = 0.0,
        nesterov: bool = False, decay_form: str = "sign") -> torch.optim.Optimizer:
    return EG(params, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
              decay=decay_form)


def _egpm(params: Iterable[Any], lr: float, weight_decay: float = 0.0,
          egpm_offset: float = 0.01, egpm_normalize: bool = False) -> torch.optim.Optimizer:
    return EGPM(params, lr=lr, offset=egpm_offset, normalize=egpm_normalize,
                weight_decay=weight_decay)


def _adam_gd(params: Iterable[Any], lr: float, weight_decay: float = 0.0, beta1: float = 0.9,
             beta2: float = 0.999, eps: float = 1e-8, amsgrad: bool = False
             ) -> torch.optim.Optimizer:
    return AdamGD(params, lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=weight_decay,
                  amsgrad=amsgrad)


def _adam_eg(params: Iterable[Any], lr: float, weight_decay: float = 0.0, beta1: float = 0.9,
             beta2: float = 0.999, eps: float = 1e-8, amsgrad: bool = False,
             decay_form: str = "decoupled") -> torch.optim.Optimizer:
    return AdamEG(params, lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=weight_decay,
                  amsgrad=amsgrad, decay=decay_form)


def _madam(params: Iterable[Any], lr: float, weight_decay: float = 0.0, p_scale: float = 3.0,
           g_bound: float = 10.0, beta2: float = 0.999) -> torch.optim.Optimizer:
    # Madam's second-moment decay is Adam's beta2 (the config has one name for both).
    return Madam(params, lr=lr, p_scale=p_scale, g_bound=g_bound, beta=beta2,
                 weight_decay=weight_decay)


def _lns_madam(params: Iterable[Any], lr: float, weight_decay: float = 0.0,
               p_scale: float = 3.0, g_bound: float = 10.0, beta2: float = 0.999,
               lns_bits: int = 8, lns_frac_bits: int = 3) -> torch.optim.Optimizer:
    return LNSMadam(params, lr=lr, bits=lns_bits, frac_bits=lns_frac_bits, p_scale=p_scale,
                    g_bound=g_bound, beta=beta2, weight_decay=weight_decay)


_ADDITIVE = {"multiplicative": False}
register("gd", _gd)
register("sgd", _sgd)
register("gd_sign", _gd_sign, bias_group={"preserve_signs": False})
register("eg", _eg, bias_group=_ADDITIVE)
register("egpm", _egpm)  # multiplicative in u, v > 0, which move even where w = 0
register("adam_gd", _adam_gd)
register("adam_eg", _adam_eg, bias_group=_ADDITIVE)
register("madam", _madam, bias_group=_ADDITIVE)
register("lns_madam", _lns_madam, bias_group=_ADDITIVE)
