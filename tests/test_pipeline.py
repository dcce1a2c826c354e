"""The stage pipeline composes: stages run in their documented order, a later stage's
finalize starts from the earlier ones' result, hooks see the training plan, the model and
the optimizer (and the gradients before the step), a metric reported twice is refused
when the pipeline is built, and a mask parametrization stacks with QAT's fake-quantizer
on one weight (prune then quantize: one packed model holding both)."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from conftest import tiny_config
from torch import nn
from torch.nn.utils import parametrize

import quant
from quant import IntFormat, QuantConfig
from quant.transforms import fake_quant_of, float_weight, strip_qat_
from trainables.config import TrialConfig
from trainables.data import load_splits
from trainables.loop import run_trial
from trainables.models import build_model
from trainables.sessions import LocalSession
from trainables.stages import (
    STAGE_ORDER,
    Pipeline,
    Stage,
    TrainingPlan,
    build_pipeline,
    register_stage,
    registered,
)
from trainables.stages import pipeline as pipeline_module
from trainables.stages.quant import QuantStage


class Mask(nn.Module):
    """A fixed 0/1 mask as a parametrization (what a pruning stage registers)."""

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w * self.mask


def checkerboard(shape: torch.Size) -> torch.Tensor:
    n = math.prod(shape)
    return (torch.arange(n) % 2).reshape(shape).float()


class MaskStage(Stage):
    """Masks every other weight of each Linear/Conv layer; records what the hooks saw."""

    name = "prune"

    def __init__(self) -> None:
        self.plan_seen: TrainingPlan | None = None
        self.grads_masked = True
        self.steps: list[int] = []
        self.optimizer_seen = None

    def metric_names(self) -> frozenset[str]:
        return frozenset({"sparsity"})

    def plan(self, plan: TrainingPlan) -> None:
        self.plan_seen = plan

    def prepare(self, model: nn.Module) -> nn.Module:
        for fqn, module in model.named_modules():
            if quant.transforms.default_filter(module, fqn):
                parametrize.register_parametrization(
                    module, "weight", Mask(checkerboard(module.weight.shape)))
        return model

    def before_step(self, model: nn.Module, optimizer) -> None:
        for module in self._masked(model):
            grad = module.parametrizations["weight"].original.grad
            # The mask's own backward already zeroes these: what a stage would enforce.
            self.grads_masked &= bool((grad[module.parametrizations["weight"][0].mask == 0]
                                       == 0).all())

    def after_step(self, step: int, model: nn.Module, optimizer) -> None:
        self.steps.append(step)
        self.optimizer_seen = optimizer

    def finalize(self, ctx) -> dict[str, float]:
        result = copy.deepcopy(ctx.result)
        ctx.result = self.result = result  # the quant stage must start from this object
        weights = [m.weight for m in self._masked(result)]
        zeros = sum(int((w == 0).sum()) for w in weights)
        return {"sparsity": zeros / sum(w.numel() for w in weights)}

    @staticmethod
    def _masked(model: nn.Module) -> list[nn.Module]:
        return [m for m in model.modules() if parametrize.is_parametrized(m, "weight")
                and isinstance(m.parametrizations["weight"][0], Mask)]


class SpyQuant(QuantStage):
    """The real quant stage, remembering which model its finalize started from."""

    def finalize(self, ctx):
        self.started_from = ctx.result
        return super().finalize(ctx)


def test_the_order_is_documented_and_plugins_follow_it(monkeypatch) -> None:
    monkeypatch.setattr(pipeline_module, "_BUILDERS", dict(pipeline_module._BUILDERS))
    assert STAGE_ORDER == ("lowrank", "prune", "lc", "quant", "weight_rounding", "export")
    register_stage("mine", lambda cfg: None)
    register_stage("prune", lambda cfg: MaskStage())
    assert registered() == ["prune", "lc", "quant", "weight_rounding", "export", "mine"]
    cfg = TrialConfig().with_overrides(["quant.mode=qat", "evaluate.weight_rounding=[int8]"])
    assert [s.name for s in build_pipeline(cfg)] == ["prune", "quant", "weight_rounding"]
    register_stage("export", lambda cfg: MaskStage())  # named other than registered
    with pytest.raises(ValueError, match="registered as 'export' built a stage named 'prune'"):
        build_pipeline(cfg)


def test_two_stages_reporting_one_metric_is_an_error_when_built() -> None:
    class AlsoPacks(Stage):
        name = "export"

        def metric_names(self):
            return frozenset({"packed_bytes"})

    cfg = TrialConfig().with_overrides(["quant.mode=ptq"])
    with pytest.raises(ValueError, match="stages quant and export both report the metric "
                                         "'packed_bytes'"):
        Pipeline([QuantStage(cfg), AlsoPacks()])
    with pytest.raises(ValueError, match="stage names must be unique"):
        Pipeline([MaskStage(), MaskStage()])


def test_a_stage_may_not_report_the_loops_metrics_or_undeclared_ones(tiny_root: Path
                                                                    ) -> None:
    class Liar(Stage):
        name = "liar"

        def metric_names(self):
            return frozenset({"test_acc"})

    with pytest.raises(ValueError, match="the loop and stage liar both report the metric "
                                         "'test_acc'"):
        Pipeline([Liar()])

    class Sloppy(Stage):
        name = "sloppy"

        def epoch_end(self, ctx):
            return {"surprise": 1.0}

    with pytest.raises(ValueError, match="stage sloppy reports surprise, which its "
                                         r"metric_names\(\) does not declare"):
        run_trial(tiny_config(tiny_root, "train.epochs=1"), LocalSession(),
                  stages=[Sloppy()])


def test_quantization_refuses_a_model_whose_qat_layers_an_earlier_stage_replaced(
        tiny_root: Path) -> None:
    class Replacer(Stage):
        name = "lowrank"

        def finalize(self, ctx):
            ctx.result = strip_qat_(copy.deepcopy(ctx.result))  # float layers again
            return {}

    cfg = tiny_config(tiny_root, "quant.mode=qat", "train.epochs=1")
    with pytest.raises(RuntimeError, match="holds no fake-quantized layer"):
        run_trial(cfg, LocalSession(), stages=[Replacer(), QuantStage(cfg)])


def test_mask_then_fake_quantizer_stack_on_one_weight() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(6, 4)
    mask = checkerboard(layer.weight.shape)
    parametrize.register_parametrization(layer, "weight", Mask(mask))
    fmt = IntFormat(4, symmetric=True, per_channel=True)
    quant.prepare_qat_(layer, QuantConfig(weights=fmt))
    stored = layer.parametrizations["weight"].original.detach().clone()
    assert isinstance(fake_quant_of(layer), quant.transforms.WeightFakeQuant)
    assert torch.equal(float_weight(layer), stored * mask)
    assert torch.equal(layer.weight, fmt.fake_quantize(stored * mask))  # mask, then quantize
    with pytest.raises(ValueError, match="already prepared for QAT"):
        quant.prepare_qat_(layer, QuantConfig(weights=fmt))
    stripped = strip_qat_(copy.deepcopy(layer))  # the mask stays, the quantizer goes
    assert fake_quant_of(stripped) is None and torch.equal(stripped.weight, stored * mask)
    converted = quant.convert_(copy.deepcopy(layer))
    assert not parametrize.is_parametrized(converted)
    assert torch.equal(converted.weight, fmt.fake_quantize(stored * mask))
    assert bool((converted.weight[mask == 0] == 0).all())
    # PTQ of a masked float layer quantizes the masked weight too.
    plain = nn.Linear(6, 4)
    parametrize.register_parametrization(plain, "weight", Mask(mask))
    expected = fmt.fake_quantize(plain.weight.detach())
    assert torch.equal(quant.quantize_(plain, QuantConfig(weights=fmt)).weight, expected)


def test_a_parametrization_after_the_quantizer_is_refused() -> None:
    layer = nn.Linear(4, 2)
    quant.prepare_qat_(layer, QuantConfig(weights=IntFormat(8)))
    parametrize.register_parametrization(layer, "weight", Mask(torch.ones(2, 4)))
    with pytest.raises(ValueError, match="after its fake-quantizer"):
        quant.convert_(layer)


def test_prune_then_quantize_in_one_trial_makes_one_packed_model(tiny_root: Path,
                                                                  tmp_path: Path) -> None:
    cfg = tiny_config(tiny_root, "quant.mode=qat", "quant.bits=4", "quant.per_channel=true",
                      "train.epochs=2")
    prune, quant_stage = MaskStage(), SpyQuant(cfg)
    session = LocalSession(checkpoint_dir=tmp_path / "ckpt")
    history = run_trial(cfg, session, stages=[prune, quant_stage])
    final = history[-1]
    # The hooks saw the plan before training, every step with the optimizer.
    steps_per_epoch = math.ceil(320 / 32)
    assert prune.plan_seen == TrainingPlan(epochs=2, steps_per_epoch=steps_per_epoch,
                                             data_shape=(1, 28, 10))
    assert prune.plan_seen.total_steps == 2 * steps_per_epoch
    assert prune.plan_seen.step_at(0.5) == steps_per_epoch
    assert prune.steps == list(range(1, 2 * steps_per_epoch + 1))
    assert isinstance(prune.optimizer_seen, torch.optim.Optimizer) and prune.grads_masked
    # Quantization started from the pruning stage's result.
    assert quant_stage.started_from is prune.result
    # Measured on the fake-quantized weights: half masked, plus what 4 bits round to 0.
    assert 0.5 <= final["sparsity"] < 0.6
    # One packed file with both: it reloads, keeps the zeros, scores what was evaluated.
    splits = load_splits(cfg.data, seed=cfg.train.seed)
    model = build_model(cfg.model, splits.in_channels, splits.image_size, splits.num_classes)
    quant.load_packed(tmp_path / "ckpt" / "artifacts" / "model.qsw", model)
    for fqn, module in model.named_modules():
        if quant.transforms.default_filter(module, fqn):
            assert bool((module.weight[checkerboard(module.weight.shape) == 0] == 0).all())
    model.eval()
    correct = 0
    with torch.no_grad():
        for x, y in splits.loader("test", 1000, torch.device("cpu"), seed=0):
            correct += int((model(x).argmax(1) == y).sum())
    assert correct / len(splits.test.y) == final["test_acc_q"]
