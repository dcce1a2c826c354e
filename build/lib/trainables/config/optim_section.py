"""The ``optim`` section: optimizer by registry name, its hyperparameters (which fields an
optimizer reads comes from its registry factory, :func:`optim.reads`) and the schedule."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, ClassVar, Mapping, NoReturn

import optim
from trainables.config.base import INF, ConfigError, Section, fail

__all__ = ["OptimConfig", "SCHEDULES"]


SCHEDULES = ("constant", "step", "cosine", "onecycle")


# The loop's fields of the optim section (the learning-rate schedule and the bias group);
# every other field is an optimizer hyperparameter, read by the optimizers whose registry
# factory takes it (optim.reads).
_SCHEDULE_FIELDS = {"constant": ("schedule",), "step": ("schedule", "step_epochs", "gamma"),
                    "cosine": ("schedule", "warmup_fraction"),
                    "onecycle": ("schedule", "warmup_fraction")}


@dataclass(frozen=True)
class OptimConfig(Section):
    """Optimizer (by registry name, see :func:`optim.build`) and learning-rate schedule.

    ``lr`` and ``weight_decay`` every optimizer reads. The other hyperparameters are unset
    (``None``: the optimizer's own default, ``optim.defaults(name)``); setting one that the
    chosen optimizer does not read is an error naming the optimizers that do. Values are
    checked by the optimizer itself (``optim.validate``), not repeated here.
    """

    section: ClassVar[str] = "optim"
    label_fields: ClassVar[tuple[str, ...]] = ("name",)
    name: str = "sgd"
    lr: float = 0.05
    weight_decay: float = 5e-4
    schedule: str = "onecycle"
    warmup_fraction: float = 0.2  # onecycle/cosine: share of all steps spent warming up
    step_epochs: int = 1  # step schedule: epochs between decays
    gamma: float = 0.5  # step schedule: decay factor
    momentum: float | None = None  # sgd (default 0.9), eg (0)
    nesterov: bool | None = None  # sgd (default true), eg (false)
    beta1: float | None = None  # adam_gd, adam_eg
    beta2: float | None = None  # adam_gd, adam_eg; madam and lns_madam's second-moment decay
    eps: float | None = None  # adam_gd, adam_eg
    p_scale: float | None = None  # madam, lns_madam: magnitudes stay <= p_scale * rms(initial)
    g_bound: float | None = None  # madam, lns_madam: normalized gradient clamp
    lns_bits: int | None = None  # lns_madam: bits per weight, sign included
    lns_frac_bits: int | None = None  # lns_madam: fractional exponent bits
    egpm_offset: float | None = None  # egpm: u0 = max(w, 0) + offset, v0 = max(-w, 0) + offset
    egpm_normalize: bool | None = None  # egpm: keep sum(u + v) of each tensor fixed
    # eg: sign (default; seed 000's wd * sign(w)) or l2 (wd * w);
    # adam_eg: decoupled (default; w *= 1 - lr * wd) or exp (w *= exp(-lr * wd)).
    decay_form: str | None = None
    amsgrad: bool | None = None  # adam_gd, adam_eg: AdamW's amsgrad
    sign_threshold: float | None = None  # gd_sign: where a weight that would cross 0 stops
    # Optimizers whose update never moves a weight at 0 (eg, adam_eg, madam, lns_madam,
    # gd_sign; optim.needs_bias_group) update biases and norm parameters additively in
    # bias_mode=split (they start at 0), at bias_lr (unset or 0: optim.lr); bias_mode=all
    # applies the optimizer to every parameter, biases included (seed 000's setting).
    bias_mode: str = "split"
    bias_lr: float | None = None

    def hparams(self) -> dict[str, Any]:
        """Keyword arguments for :func:`optim.build`: lr, weight_decay and the fields set."""
        loop = {"name", "bias_mode", "bias_lr",
                *(f for names in _SCHEDULE_FIELDS.values() for f in names)}
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name not in loop and getattr(self, f.name) is not None}

    def bias_group_lr(self) -> float | None:
        """The additive group's lr of a multiplicative optimizer (None: optim.lr)."""
        return self.bias_lr or None

    def read_fields(self) -> dict[str, Any]:
        """The fields this optimizer and schedule read, unset ones at their defaults."""
        values = {"name": self.name, **optim.defaults(self.name), **self.hparams()}
        if optim.needs_bias_group(self.name):
            values["bias_mode"] = self.bias_mode
            if self.bias_mode == "split":
                values["bias_lr"] = self.bias_group_lr() or self.lr
        values.update({f: getattr(self, f) for f in _SCHEDULE_FIELDS[self.schedule]})
        return values


    @classmethod
    def label(cls, flat: Mapping[str, Any]) -> str:
        return str(cls.get(flat, "name"))

    @classmethod
    def tags(cls, flat: Mapping[str, Any]) -> dict[str, str]:
        return {"optimizer": str(cls.get(flat, "name"))}

    def _validate(self) -> None:
        self._choice("name", optim.available())
        self._choice("schedule", SCHEDULES)
        self._range("warmup_fraction", 0.0, 1.0, hi_open=True)
        self._range("step_epochs", 1, INF)
        self._range("gamma", 0.0, 1.0, lo_open=True)
        self._choice("bias_mode", optim.BIAS_MODES)
        if self.bias_lr is not None:
            if not optim.needs_bias_group(self.name):
                _not_read("bias_lr", self.bias_lr, self.name,
                          tuple(n for n in optim.available() if optim.needs_bias_group(n)))
            if self.bias_mode != "split":
                fail("optim.bias_lr", self.bias_lr, "unset with optim.bias_mode="
                      f"{self.bias_mode} (every parameter takes optim.lr); bias_lr is read "
                      "with optim.bias_mode=split")
            self._range("bias_lr", 0.0, INF)
        for name, value in self.hparams().items():
            if name not in optim.reads(self.name):
                _not_read(name, value, self.name, optim.readers(name))
        self._ask_optimizer()

    def _ask_optimizer(self) -> None:
        """Let the optimizer validate its hyperparameters; name the field it rejects."""
        hparams = self.hparams()
        try:
            optim.validate(self.name, **hparams)
            return
        except ValueError as exc:
            joint = exc
        for key, value in hparams.items():  # which one alone is refused?
            try:
                optim.validate(self.name, **{"lr": self.lr, key: value})
            except ValueError as exc:
                raise ConfigError(f"optim.{key}={value!r} is invalid for optim.name="
                                  f"{self.name}: {exc}") from None
        given = ", ".join(f"optim.{k}={v!r}" for k, v in hparams.items())
        raise ConfigError(f"{given} are invalid together for optim.name={self.name}: "
                          f"{joint}") from None


def _not_read(name: str, value: Any, optimizer: str, readers: tuple[str, ...]) -> NoReturn:
    raise ConfigError(f"optim.{name}={value!r} is invalid: optim.name={optimizer} does not "
                      f"read it (read by {', '.join(readers) or 'no optimizer'}); "
                      f"{optimizer} reads optim.{', optim.'.join(optim.reads(optimizer))}")
