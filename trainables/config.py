"""One frozen, validated trial configuration, from sweep script to Ray worker.

The config is a tree of frozen dataclasses (``data``, ``model``, ``optim``,
``precision``, ``train``, ``evaluate``, ``quant``). It flattens to dotted keys
(``optim.lr``) for Ray Tune's ``param_space``, Optuna and MLflow params, and is rebuilt
from them on the first line of the worker. Every field is type-checked and range-checked
at construction: a bad value raises :class:`ConfigError` naming the field, the value and
what is allowed, before any cluster work starts.

Example::

    cfg = TrialConfig().with_overrides(["optim.lr=0.05", "model.name=lenet"])
    flat = cfg.to_flat()            # {"optim.lr": 0.05, ...}
    assert TrialConfig.from_flat(flat) == cfg
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, Iterable, Mapping, NoReturn

import yaml

import optim

__all__ = [
    "ConfigError",
    "DataConfig",
    "ModelConfig",
    "OptimConfig",
    "PrecisionConfig",
    "TrainConfig",
    "EvaluateConfig",
    "QuantSection",
    "TrialConfig",
    "DATASETS",
    "MODELS",
    "dotted_keys",
]


class ConfigError(ValueError):
    """A config field has an unknown name, a wrong type or an out-of-range value."""


DATASETS = (
    "mnist",
    "fashion_mnist",
    "emnist_digits",
    "cifar10",
    "cifar100",
    "cifar10_jpeg",
    "cats_vs_dogs",
    "image_folder",
)
MODELS = ("mlp", "lenet", "resnet20", "resnet44", "resnet56", "resnet18",
          "mobilenet_v3_small", "alexnet")
AUGMENTATIONS = ("auto", "none", "crop_flip")
SCHEDULES = ("constant", "step", "cosine", "onecycle")
PRECISIONS = ("fp32", "amp_bf16", "amp_fp16")
DEVICES = ("auto", "cpu", "cuda")


def _fail(name: str, value: Any, allowed: str) -> typing.NoReturn:
    raise ConfigError(f"{name}={value!r} is invalid: allowed {allowed}")


def _coerce(name: str, value: Any, annotation: Any) -> Any:
    """Return ``value`` as ``annotation`` (bool, int, float, str, tuple[int, ...], or one of
    them | None, where None means "not set")."""
    options = typing.get_args(annotation)
    if type(None) in options:
        if value is None:
            return None
        (annotation,) = [a for a in options if a is not type(None)]
    if annotation in (int, float) and isinstance(value, str):
        # YAML 1.1 reads "5e-4" (no dot) as a string; a number is what was meant.
        try:
            value = float(value)
        except ValueError:
            pass
    if annotation is bool:
        if isinstance(value, bool):
            return value
        _fail(name, value, "true or false")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        _fail(name, value, "an integer")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        _fail(name, value, "a number")
    if annotation is str:
        if isinstance(value, str):
            return value
        _fail(name, value, "a string")
    if typing.get_origin(annotation) is tuple:
        if isinstance(value, (list, tuple)):
            (item_type, _) = typing.get_args(annotation)
            return tuple(_coerce(f"{name}[{i}]", v, item_type) for i, v in enumerate(value))
        _fail(name, value, "a list")
    raise TypeError(f"unsupported annotation {annotation!r} for {name}")


class _Section:
    """Mixin: coerce every field to its annotated type, then run ``_validate``."""

    section: ClassVar[str] = ""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in fields(self):  # type: ignore[arg-type]
            value = _coerce(self._name(f.name), getattr(self, f.name), hints[f.name])
            object.__setattr__(self, f.name, value)
        self._validate()

    def _name(self, field_name: str) -> str:
        return f"{self.section}.{field_name}"

    def _choice(self, field_name: str, allowed: Iterable[str]) -> None:
        value = getattr(self, field_name)
        allowed = tuple(allowed)
        if value not in allowed:
            _fail(self._name(field_name), value, "one of " + ", ".join(allowed))

    def _range(self, field_name: str, lo: float, hi: float, lo_open: bool = False,
               hi_open: bool = False) -> None:
        value = getattr(self, field_name)
        below = value <= lo if lo_open else value < lo
        above = value >= hi if hi_open else value > hi
        if math.isnan(value) or below or above:
            lower = f"> {lo}" if lo_open else f">= {lo}"
            upper = "" if hi == INF else (f" and < {hi}" if hi_open else f" and <= {hi}")
            _fail(self._name(field_name), value, f"a value {lower}{upper}")

    def _validate(self) -> None:  # overridden by sections with rules
        pass


INF = math.inf


@dataclass(frozen=True)
class DataConfig(_Section):
    """Dataset and batching. ``root`` empty means ``$QSWEEP_DATA`` (else ``./data``)."""

    section: ClassVar[str] = "data"
    name: str = "mnist"
    root: str = ""
    cache_dir: str = ""  # empty: $QSWEEP_CACHE, else ~/.cache/qsweep
    folder: str = ""  # image_folder only: a folder holding train/<class>/ and test/<class>/
    image_size: int = 0  # 0: native size (32 for cifar10_jpeg, 64 for other folders)
    batch_size: int = 128
    test_batch_size: int = 1000
    val_fraction: float = 0.0  # held out of train; metrics val_loss / val_acc
    train_subset: int = 0  # 0: all examples; else the first N (after a seeded shuffle)
    test_subset: int = 0
    augment: str = "auto"  # auto: crop_flip for the colour datasets, none otherwise
    # An extra test set of the same classes (image folder <class>/<image>, relative to the
    # data root or absolute): every epoch reports extra_acc, a quantized trial extra_acc_q.
    extra_test: str = ""

    def _validate(self) -> None:
        self._choice("name", DATASETS)
        self._choice("augment", AUGMENTATIONS)
        self._range("image_size", 0, 1024)
        self._range("batch_size", 1, 1 << 20)
        self._range("test_batch_size", 1, 1 << 20)
        self._range("val_fraction", 0.0, 0.5, hi_open=True)
        self._range("train_subset", 0, INF)
        self._range("test_subset", 0, INF)
        if self.name == "image_folder" and not self.folder:
            _fail("data.folder", self.folder,
                  "a folder with train/ and test/ subfolders when data.name=image_folder")


@dataclass(frozen=True)
class ModelConfig(_Section):
    """Architecture. ``widths`` are MLP hidden sizes; ``channels``/``hidden`` shape LeNet."""

    section: ClassVar[str] = "model"
    name: str = "lenet"
    widths: tuple[int, ...] = (256, 128)
    channels: tuple[int, ...] = (16, 32)
    hidden: tuple[int, ...] = (128,)
    kernel_size: int = 3
    batch_norm: bool = False
    dropout: float = 0.0

    def _validate(self) -> None:
        self._choice("name", MODELS)
        for name in ("widths", "channels", "hidden"):
            values = getattr(self, name)
            if not values or any(v < 1 for v in values):
                _fail(self._name(name), list(values), "a non-empty list of positive integers")
        if len(self.channels) != 2:
            _fail("model.channels", list(self.channels), "exactly two conv widths, e.g. [16, 32]")
        if self.kernel_size not in (3, 5):
            _fail("model.kernel_size", self.kernel_size, "3 or 5")
        self._range("dropout", 0.0, 1.0, hi_open=True)


# The loop's fields of the optim section (the learning-rate schedule and the bias group);
# every other field is an optimizer hyperparameter, read by the optimizers whose registry
# factory takes it (optim.reads).
_SCHEDULE_FIELDS = {"constant": ("schedule",), "step": ("schedule", "step_epochs", "gamma"),
                    "cosine": ("schedule", "warmup_fraction"),
                    "onecycle": ("schedule", "warmup_fraction")}


@dataclass(frozen=True)
class OptimConfig(_Section):
    """Optimizer (by registry name, see :func:`optim.build`) and learning-rate schedule.

    ``lr`` and ``weight_decay`` every optimizer reads. The other hyperparameters are unset
    (``None``: the optimizer's own default, ``optim.defaults(name)``); setting one that the
    chosen optimizer does not read is an error naming the optimizers that do. Values are
    checked by the optimizer itself (``optim.validate``), not repeated here.
    """

    section: ClassVar[str] = "optim"
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
                _fail("optim.bias_lr", self.bias_lr, "unset with optim.bias_mode="
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


@dataclass(frozen=True)
class PrecisionConfig(_Section):
    """Arithmetic of the forward/backward pass: FP32, or autocast with bf16/fp16."""

    section: ClassVar[str] = "precision"
    mode: str = "fp32"

    def _validate(self) -> None:
        self._choice("mode", PRECISIONS)


@dataclass(frozen=True)
class TrainConfig(_Section):
    """Epochs, seed and resources. ``num_workers > 1`` trains with DDP under Ray Train."""

    section: ClassVar[str] = "train"
    epochs: int = 2
    seed: int = 0
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0  # with use_gpu; fractional lets small trials share a GPU
    threads: int = 0  # torch intra-op threads per worker; 0: round(cpus_per_worker)
    device: str = "auto"  # auto: cuda when use_gpu and available, else cpu
    checkpoint: bool = True  # a checkpoint every epoch (model, optimizer, schedule, RNG)
    # Start from the weights of a trained model of the same architecture: a qsweep
    # checkpoint folder (or its state.pt), e.g. QAT fine-tuning of an FP32 model. Only
    # the weights: optimizer, schedule and epochs start afresh. "": the seeded init.
    init_from: str = ""
    # Diverged: weights inf/NaN, or this many non-finite batch losses in a row (every
    # step skipped); the trial then stops within its epoch (trainables/loop.py).
    nonfinite_streak: int = 20

    def _validate(self) -> None:
        self._range("epochs", 1, 100_000)
        self._range("nonfinite_streak", 1, 10**9)
        self._range("seed", 0, 2**31 - 1)
        self._range("num_workers", 1, 4096)
        self._range("cpus_per_worker", 0.0, 1024, lo_open=True)
        self._range("gpus_per_worker", 0.0, 64, lo_open=True)
        self._range("threads", 0, 1024)
        self._choice("device", DEVICES)
        if self.device == "cuda" and not self.use_gpu:
            _fail("train.device", "cuda", "auto or cpu unless train.use_gpu=true")


@dataclass(frozen=True)
class EvaluateConfig(_Section):
    """Evaluations a trial runs after its last epoch (trial stages, see trainables.stages).

    ``weight_rounding``: number formats (``lns8``, ``lns4``) to round every 2+-dim weight
    tensor to (weight-only post-training rounding, scale = max |w| per tensor); each adds
    the metric ``test_acc_<format>`` and the file ``weight_rounding.json``.
    """

    section: ClassVar[str] = "evaluate"
    weight_rounding: tuple[str, ...] = ()

    def _validate(self) -> None:
        from trainables.weight_rounding import FORMATS  # lazy: that module imports this one

        for i, name in enumerate(self.weight_rounding):
            if name not in FORMATS:
                _fail(f"evaluate.weight_rounding[{i}]", name, "one of " + ", ".join(FORMATS))


QUANT_MODES = ("none", "ptq", "qat")
QUANT_FORMATS = ("int", "lns", "codebook", "fp16", "bf16")


@dataclass(frozen=True)
class QuantSection(_Section):
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
        if self.lsq and (self.mode != "qat" or self.format != "int" or not self.symmetric):
            _fail("quant.lsq", self.lsq, f"false with quant.mode={self.mode}, quant.format="
                  f"{self.format}, quant.symmetric={str(self.symmetric).lower()} (LSQ "
                  "learns the step of symmetric int weights in QAT)")
        if self.lsq and self.qat_start_epoch:
            _fail("quant.lsq", self.lsq, f"false with quant.qat_start_epoch="
                  f"{self.qat_start_epoch} (the step would start from the untrained weights "
                  "and sit unused through the float epochs); allowed with qat_start_epoch=0")
        if self.gradient_bits and self.mode != "qat":
            _fail("quant.gradient_bits", self.gradient_bits,
                  f"0 with quant.mode={self.mode} (gradients are rounded in QAT training)")
        if self.gradient_bits:
            try:
                self.gradient_quant_format()
            except ValueError as exc:
                raise ConfigError(f"quant.gradient_bits is invalid: {exc}") from None
        if self.first_last_bits and self.format not in ("int", "lns"):
            _fail("quant.first_last_bits", self.first_last_bits,
                  f"0 with quant.format={self.format} (bit widths: int and lns only)")
        if self.layer_bits and self.format not in ("int", "lns"):
            _fail("quant.layer_bits", list(self.layer_bits),
                  f"[] with quant.format={self.format} (bit widths: int and lns only)")
        if self.layer_bits and self.first_last_bits:
            _fail("quant.first_last_bits", self.first_last_bits,
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


_SECTIONS: dict[str, type[_Section]] = {
    "data": DataConfig,
    "model": ModelConfig,
    "optim": OptimConfig,
    "precision": PrecisionConfig,
    "train": TrainConfig,
    "evaluate": EvaluateConfig,
    "quant": QuantSection,
}


@dataclass(frozen=True)
class TrialConfig:
    """The whole configuration of one trial."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    quant: QuantSection = field(default_factory=QuantSection)

    def __post_init__(self) -> None:
        q = self.quant
        if q.mode == "qat" and q.qat_start_epoch >= self.train.epochs:
            _fail("quant.qat_start_epoch", q.qat_start_epoch,
                  f"a value < train.epochs ({self.train.epochs}): QAT would never start")

    # -- construction -------------------------------------------------------------------
    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "TrialConfig":
        """Build from nested (``{"optim": {"lr": 0.1}}``) or dotted (``{"optim.lr": 0.1}``)
        keys; missing fields keep their defaults."""
        return cls().replace(values)

    from_flat = from_dict

    @classmethod
    def from_stored(cls, values: Mapping[str, Any]) -> "TrialConfig":
        """A config as an older qsweep saved it (checkpoints, MLflow, Tune folders): it wrote
        every optimizer field, read or not. Fields the optimizer does not read had no
        effect then and are dropped; ``optim.bias_lr=0`` meant unset; a config without
        ``optim.decay_form`` keeps the decay eg and adam_eg had then."""
        flat = dotted_keys(values)
        name = flat.get("optim.name", OptimConfig.name)
        if name in optim.available():
            unread = {f.name for f in fields(OptimConfig) if f.default is None} - \
                set(optim.reads(name))
            if not optim.needs_bias_group(name) or flat.get("optim.bias_lr") == 0:
                unread.add("bias_lr")
            # Before decay_form existed, eg's decay was L2 and adam_eg's exp(-lr * wd).
            old_decay = {"eg": "l2", "adam_eg": "exp"}
            if name in old_decay and "optim.decay_form" not in flat:
                flat["optim.decay_form"] = old_decay[name]
            flat = {k: v for k, v in flat.items()
                    if k.partition(".")[2] not in unread or not k.startswith("optim.")}
        return cls.from_flat(flat)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "TrialConfig":
        return cls().with_yaml(path)

    def with_yaml(self, path: str | Path) -> "TrialConfig":
        """A copy with the overrides of a YAML file (sections or dotted keys) applied."""
        return self.replace(_read_yaml(path))

    def replace(self, values: Mapping[str, Any]) -> "TrialConfig":
        """A copy with ``values`` (nested or dotted keys) applied, validated."""
        grouped: dict[str, dict[str, Any]] = {}
        for key, value in dotted_keys(values).items():
            section, _, name = key.partition(".")
            if section not in _SECTIONS:
                raise ConfigError(f"unknown config section {section!r} in key {key!r}: "
                                  f"allowed sections {', '.join(_SECTIONS)}")
            known = [f.name for f in fields(_SECTIONS[section])]
            if name not in known:
                raise ConfigError(f"unknown config key {key!r}: fields of {section} are "
                                  f"{', '.join(known)}")
            grouped.setdefault(section, {})[name] = value
        sections = {s: dataclasses.replace(getattr(self, s), **grouped.get(s, {}))
                    for s in _SECTIONS}
        return TrialConfig(**sections)

    def with_overrides(self, assignments: Iterable[str]) -> "TrialConfig":
        """Apply ``key=value`` strings (values parsed as YAML: ``0.1``, ``true``, ``[8,16]``)."""
        values = {}
        for text in assignments:
            key, sep, raw = text.partition("=")
            if not sep or not key.strip():
                raise ConfigError(f"override {text!r} is invalid: allowed the form key=value, "
                                  "e.g. optim.lr=0.1")
            values[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
        return self.replace(values)

    # -- export -------------------------------------------------------------------------
    def to_flat(self) -> dict[str, Any]:
        """Dotted keys to plain values (tuples become lists), for Tune, Optuna and MLflow."""
        flat = {}
        for section in _SECTIONS:
            for key, value in dataclasses.asdict(getattr(self, section)).items():
                flat[f"{section}.{key}"] = list(value) if isinstance(value, tuple) else value
        return flat

    def tracked_params(self) -> dict[str, Any]:
        """What MLflow logs: every field, but of ``optim`` only those the chosen optimizer
        and schedule read (unset hyperparameters at the optimizer's defaults)."""
        flat = {k: v for k, v in self.to_flat().items() if not k.startswith("optim.")}
        read = {f"optim.{k}": v for k, v in self.optim.read_fields().items()}
        return {**read, **flat}

    def to_nested(self) -> dict[str, dict[str, Any]]:
        nested: dict[str, dict[str, Any]] = {}
        for key, value in self.to_flat().items():
            section, _, name = key.partition(".")
            nested.setdefault(section, {})[name] = value
        return nested

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_nested(), sort_keys=False)


def dotted_keys(values: Mapping[str, Any]) -> dict[str, Any]:
    """Flatten one level of nesting: ``{"optim": {"lr": 1}}`` -> ``{"optim.lr": 1}``."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if not isinstance(key, str):
            raise ConfigError(f"config key {key!r} is invalid: allowed strings such as optim.lr")
        if isinstance(value, Mapping):
            for sub, sub_value in value.items():
                flat[f"{key}.{sub}"] = sub_value
        else:
            flat[key] = value
    return flat


def yaml_problem(exc: Exception) -> tuple[str, str]:
    """(``"line L, column C"`` or "", the problem) of a YAML parse error."""
    mark = getattr(exc, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    return where, str(getattr(exc, "problem", None) or exc)


def _read_yaml(path: str | Path) -> Mapping[str, Any]:
    try:
        with open(path) as fh:
            loaded = yaml.safe_load(fh) or {}
    except OSError as exc:
        raise ConfigError(f"config file {str(path)!r} cannot be read: "
                          f"{exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        where, problem = yaml_problem(exc)
        at = f" at {where}" if where else ""
        raise ConfigError(f"config file {str(path)!r} is not valid YAML{at}: "
                          f"{problem}") from None
    if not isinstance(loaded, Mapping):
        raise ConfigError(f"config file {str(path)!r} is invalid: allowed a YAML mapping of "
                          f"sections ({', '.join(_SECTIONS)}) or dotted keys")
    return loaded
