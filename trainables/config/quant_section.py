"""The ``quant`` section: weight (and activation, gradient) quantization of a trial."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

from trainables.config.base import INF, ConfigError, Section, fail

__all__ = ["QuantSection", "QUANT_MODES", "QUANT_FORMATS"]


QUANT_MODES = ("none", "ptq", "qat")


QUANT_FORMATS = ("int", "lns", "codebook", "fp16", "bf16")


@dataclass(frozen=True)
class QuantSection(Section):
    """Weight quantization of the trial (``quant/``): ``ptq`` quantizes the trained model
    at the end; ``qat`` trains through fake-quantized weights (straight-through
    estimator) from the first step and converts at the end. Both evaluate the quantized
    model (``test_acc_q``) and write it packed (``model.qsw``, ``packed_bytes``,
    ``compression_ratio``). ``first_last_bits`` > 0 keeps the first and last layer at that
    many bits (int/lns): the usual mixed-precision recipe. ``layer_bits`` gives every
    quantized layer its own bits (int/lns; one entry per Linear/Conv layer in the model's
    order: mixed precision as a per-layer search sets it). ``activation_bits`` > 0 also
    quantizes every quantized layer's input (per tensor, range by ``observer``; PTQ
    calibrates it on 8 training batches). ``gradient_bits`` > 0 (QAT) rounds the
    gradients of every quantized layer's output and weight in the backward pass: with
    ``format=lns``, ``activation_format=lns`` and ``gradient_format=lns`` the trial trains
    all in LNS, LNS-Madam's setting. ``lsq`` (QAT, symmetric int) trains each weight's step
    size (LSQ) instead of taking it from the weights' min and max."""

    section: ClassVar[str] = "quant"
    read_only_when: ClassVar[Mapping[str, Mapping[str, tuple[Any, ...]]]] = {
        # Not k (codebook) or qat_start_epoch (qat): a sweep's base config sets them for
        # the trials of the format or mode that reads them, beside trials that do not.
        "first_last_bits": {"format": ("int", "lns")},  # bit widths: int and lns only
        "layer_bits": {"format": ("int", "lns")},
        "gradient_bits": {"mode": ("qat",)},  # gradients are rounded in QAT training
        # LSQ learns the step of symmetric int weights in QAT, from the first step (from
        # a later epoch it would start from the untrained weights and sit unused).
        "lsq": {"mode": ("qat",), "format": ("int",), "symmetric": (True,),
                "qat_start_epoch": (0,)},
    }
    label_fields: ClassVar[tuple[str, ...]] = ("mode", "format", "bits", "k")
    mode: str = "none"
    format: str = "int"
    bits: int = 8  # int, lns (sign included)
    symmetric: bool = True  # int
    per_channel: bool = False  # int, lns: one scale per output channel
    lns_frac_bits: int = 0  # lns: 2**k codes per octave
    k: int = 16  # codebook entries per tensor
    first_last_bits: int = 0
    layer_bits: tuple[int, ...] = ()  # int/lns: bits of each quantized layer, in order
    byte_budget: int = 0  # packed bytes; 0: none (budget_score = the quantized accuracy)
    qat_start_epoch: int = 0  # qat: epochs trained in float first (fake-quant off)
    activation_bits: int = 0  # inputs of quantized layers, per tensor; 0: float
    activation_format: str = "int"  # int, lns (lns_frac_bits fractional bits)
    activation_symmetric: bool = False
    observer: str = "moving_average"  # activation range: minmax, moving_average, ...
    gradient_bits: int = 0  # qat: layer output and weight gradients rounded; 0: float
    gradient_format: str = "lns"  # lns (lns_frac_bits), int (per tensor, symmetric)
    lsq: bool = False  # qat, int symmetric: learned step sizes (LSQ) instead of min-max

    def _validate(self) -> None:
        self._choice("mode", QUANT_MODES)
        self._choice("format", QUANT_FORMATS)
        self._range("first_last_bits", 0, 16)
        self._range("byte_budget", 0, INF)
        self._range("qat_start_epoch", 0, INF)
        self._choice("observer", ("minmax", "moving_average", "percentile", "mse"))
        self._choice("activation_format", ("int", "lns"))
        self._choice("gradient_format", ("lns", "int"))
        if self.gradient_bits:
            try:
                self.gradient_quant_format()
            except ValueError as exc:
                raise ConfigError(f"quant.gradient_bits is invalid: {exc}") from None
        if self.layer_bits and self.first_last_bits:
            fail("quant.first_last_bits", self.first_last_bits,
                  "0 when quant.layer_bits gives every layer's bits")
        for i, bits in enumerate(self.layer_bits):
            try:
                self.weight_format(bits)
            except ValueError as exc:
                raise ConfigError(f"quant.layer_bits[{i}]={bits!r} is invalid for "
                                  f"quant.format={self.format}: {exc}") from None
        if self.activation_bits:
            try:
                self.activation_quant_format()
            except ValueError as exc:
                raise ConfigError(f"quant.activation_bits is invalid: {exc}") from None
        # The format classes validate their own arguments (one source of truth); their
        # message names the argument, which is a field here (frac_bits: lns_frac_bits).
        for field_name, bits in (("bits", None), ("first_last_bits", self.first_last_bits)):
            if field_name == "first_last_bits" and not bits:
                continue
            try:
                self.weight_format(bits)
            except ValueError as exc:
                argument = str(exc).partition("=")[0]
                name = field_name if argument == "bits" else \
                    {"frac_bits": "lns_frac_bits"}.get(argument, argument)
                raise ConfigError(f"quant.{name} is invalid for quant.format={self.format}: "
                                  f"{exc}") from None

    @classmethod
    def label(cls, flat: Mapping[str, Any]) -> str:
        """``int4-qat``, ``lns8-ptq``, ``codebook16-qat``, ``fp16-ptq``, ``int-mixed-qat``
        (bits per layer); "" when not quantizing."""
        mode = cls.get(flat, "mode")
        if mode in (None, "none"):
            return ""
        fmt = cls.get(flat, "format")
        if flat.get("quant.layer_bits"):  # bits per layer: quant.bits is not used
            return f"{fmt}-mixed-{mode}"
        size = {"codebook": cls.get(flat, "k"), "fp16": "", "bf16": ""}.get(
            fmt, cls.get(flat, "bits"))
        return f"{fmt}{size if size is not None else ''}-{mode}"

    @classmethod
    def tags(cls, flat: Mapping[str, Any]) -> dict[str, str]:
        return {"quant": cls.label(flat) or "none"}

    def activation_quant_format(self) -> Any:
        """The per-tensor format of layer inputs (INT or LNS), or None (float)."""
        import quant

        if not self.activation_bits:
            return None
        if self.activation_format == "lns":
            return quant.LNSFormat(self.activation_bits, self.lns_frac_bits)
        return quant.IntFormat(self.activation_bits, self.activation_symmetric)

    def gradient_quant_format(self) -> Any:
        """The format gradients are rounded to in QAT's backward pass, or None (float)."""
        import quant

        if not self.gradient_bits:
            return None
        if self.gradient_format == "lns":
            return quant.LNSFormat(self.gradient_bits, self.lns_frac_bits)
        return quant.IntFormat(self.gradient_bits, symmetric=True)

    def weight_format(self, bits: int | None = None) -> Any:
        """The ``quant`` format object these fields describe (``bits`` overrides)."""
        import quant

        bits = self.bits if bits is None else bits
        if self.format == "int":
            return quant.IntFormat(bits, self.symmetric, self.per_channel)
        if self.format == "lns":
            return quant.LNSFormat(bits, self.lns_frac_bits, self.per_channel)
        if self.format == "codebook":
            return quant.CodebookFormat(self.k)
        return quant.FloatFormat(self.format)
