"""The ``lc`` section: the LC (learning-compression) algorithm (:mod:`compress.lc`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

from trainables.config.base import ConfigError, Section, fail

__all__ = ["LCSection"]


@dataclass(frozen=True)
class LCSection(Section):
    """Compress the weights with the LC algorithm: ``conv`` (every Conv2d), ``linear``
    (every Linear) and ``layers`` (per layer, ``"fc3=codebook:2; conv1=none"``, over the
    layer type's) each name a compression (``codebook:k=K``, ``prune:keep=F`` or
    ``prune:kappa=N``, ``lowrank:rank=R`` or ``lowrank:alpha=A``, ``int:bits=B``,
    ``none``; see :mod:`compress.lc`). LC is on when any layer gets one.

    Training is ``train.epochs`` long: the first ``train.epochs - steps x epochs_per_step``
    train the reference model (or fine-tune ``train.init_from``'s; set ``train.epochs =
    steps x epochs_per_step`` to start LC from that model as it is), then
    ``steps`` L steps of ``epochs_per_step`` epochs each, with ``mu_k = mu0 x growth^k``,
    each followed by a C step. ``steps=0`` is direct compression (train, then compress
    once): the baseline LC improves on. Within each L step the learning rate follows
    ``optim.schedule`` afresh, from ``optim.lr x lr_decay^k``. ``lagrangian``: the
    augmented Lagrangian (multipliers) rather than the quadratic penalty alone. The
    final model is the compressed one: evaluated, packed (``model.qsw``) and reported
    (``test_acc_lc``, ``packed_bytes``, ``compression_ratio``, ``params``, ``macs``)."""

    section: ClassVar[str] = "lc"
    conv: str = "none"
    linear: str = "none"
    layers: str = ""
    steps: int = 0
    epochs_per_step: int = 1
    mu0: float = 9e-5
    growth: float = 1.1
    lr_decay: float = 1.0
    lagrangian: bool = True
    label_fields: ClassVar[tuple[str, ...]] = ("conv", "linear", "layers", "steps")

    def _validate(self) -> None:
        from compress.lc import parse_compression, parse_layer_map

        for name in ("conv", "linear"):
            try:
                parse_compression(getattr(self, name))
            except ValueError as exc:
                raise ConfigError(f"lc.{name}={getattr(self, name)!r} is invalid: {exc}") \
                    from None
        try:
            parse_layer_map(self.layers)
        except ValueError as exc:
            raise ConfigError(f"lc.layers={self.layers!r} is invalid: {exc}") from None
        self._range("steps", 0, 10_000)
        self._range("epochs_per_step", 1, 10_000)
        self._range("mu0", 0.0, float("inf"), lo_open=True, hi_open=True)
        self._range("growth", 1.0, float("inf"), lo_open=True, hi_open=True)
        self._range("lr_decay", 0.0, 1.0, lo_open=True)

    @property
    def enabled(self) -> bool:
        from compress.lc import parse_compression, parse_layer_map

        return any(parse_compression(t).kind != "none" for t in (self.conv, self.linear)) \
            or any(c.kind != "none" for c in parse_layer_map(self.layers).values())

    @property
    def lc_epochs(self) -> int:
        """Epochs of the L steps (the rest of train.epochs trains the reference)."""
        return self.steps * self.epochs_per_step

    def check_epochs(self, epochs: int, init_from: str) -> None:
        """Refuse a schedule longer than training, or no reference training without
        ``train.init_from`` (LC compresses a trained model)."""
        if not self.enabled:
            return
        if self.lc_epochs > epochs:
            fail("lc.steps", self.steps, f"at most {epochs // self.epochs_per_step}: "
                 f"lc.steps x lc.epochs_per_step ({self.lc_epochs} epochs) must fit in "
                 f"train.epochs ({epochs})")
        if self.lc_epochs == epochs and not init_from:
            fail("lc.steps", self.steps, f"fewer than {self.steps} (train.epochs="
                 f"{epochs} leaves no epoch to train the reference model) or set "
                 "train.init_from to a trained model")

    @classmethod
    def label(cls, flat: Mapping[str, Any]) -> str:
        """``lc-conv:prune:keep=0.05-linear:codebook:k=2``; "" without LC."""
        parts = [f"{f}:{cls.get(flat, f)}" for f in ("conv", "linear")
                 if cls.get(flat, f) not in ("none", "")]
        if cls.get(flat, "layers"):
            parts.append(str(cls.get(flat, "layers")).replace(" ", ""))
        return "lc-" + "-".join(parts) if parts else ""

    @classmethod
    def tags(cls, flat: Mapping[str, Any]) -> dict[str, str]:
        return {"lc": cls.label(flat) or "none"}
