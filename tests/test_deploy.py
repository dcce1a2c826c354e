"""Deployment (deploy/, the export stage): ONNX FP32/INT8 round trips against torch,
INT8 PT2E against its own fake-quant reference and against the project's INT8
fake-quant twin, file sizes, MLflow models loaded back from a real store, bad input."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import class_images, tiny_config
from torch import nn

import quant
from deploy.formats import FORMATS, DeployError, deploy, plain_copy
from deploy.measure import PeakRSS, percentile, relative_latency, time_calls
from deploy.onnx_io import onnx_bytes, onnx_files
from trainables.config import EXPORT_FORMATS, ConfigError, ModelConfig, TrialConfig
from trainables.models import build_model


def trained_lenet(seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A LeNet (16/32 channels, 28 px, 4 classes) trained a few hundred steps on the
    block-position images: (model, test images, test labels), accuracy well above
    chance so that predictions mean something."""
    torch.manual_seed(seed)
    images, labels = class_images(640, 4, 1, 28, seed)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    y = torch.from_numpy(labels)
    model = build_model(ModelConfig(name="lenet", channels=(16, 32), hidden=(64,)), 1, 28, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(150):
        i = torch.randint(0, 512, (32,))
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[i]), y[i]).backward()
        opt.step()
    return model.eval(), x[512:], y[512:]


@pytest.fixture(scope="module")
def lenet():
    return trained_lenet()


def test_the_config_lists_the_formats_deploy_knows() -> None:
    assert EXPORT_FORMATS == FORMATS


@pytest.mark.parametrize("override, field", [
    ("export.formats=[int4]", "export.formats[0]"),
    ("export.formats=[onnx_fp32,onnx_fp32]", "export.formats"),
    ("export.calibration_batches=0", "export.calibration_batches")])
def test_bad_export_fields_name_the_field(override: str, field: str) -> None:
    with pytest.raises(ConfigError, match=rf"{field.replace('[', '.').replace(']', '.')}"):
        TrialConfig().with_overrides([override])


def test_a_missing_onnxruntime_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    with pytest.raises(ConfigError, match="onnxruntime not installed"):
        TrialConfig().with_overrides(["export.formats=[fp32,onnx_int8]"])
    TrialConfig().with_overrides(["export.formats=[fp32,int8_pt2e]"])  # no ONNX: fine


def test_onnx_fp32_and_int8_round_trip(lenet, tmp_path: Path) -> None:
    """onnxruntime FP32 equals torch to float rounding; INT8 QDQ keeps the predictions
    (>= 95% agree) and is <= 0.3x the bytes of FP32 with its external data."""
    model, x, _ = lenet
    calibration = [x[i:i + 32] for i in range(0, 64, 32)]
    with torch.no_grad():
        want = model(x)
    fp32 = deploy(model, "onnx_fp32", x[:1], None, tmp_path)
    int8 = deploy(model, "onnx_int8", x[:1], calibration, tmp_path)
    torch.testing.assert_close(fp32(x), want, rtol=1e-4, atol=1e-4)
    assert (int8(x).argmax(1) == want.argmax(1)).float().mean() >= 0.95
    files = onnx_files(tmp_path / "model.onnx")
    assert any(f.suffix == ".data" for f in files), "the FP32 weights are external data"
    assert fp32.nbytes == onnx_bytes(tmp_path / "model.onnx") == sum(
        f.stat().st_size for f in files)
    assert int8.nbytes <= 0.3 * fp32.nbytes
    assert fp32(x[:5]).shape == (5, 4)  # any batch size


def test_fp16_and_bf16_keep_the_predictions(lenet, tmp_path: Path) -> None:
    model, x, _ = lenet
    with torch.no_grad():
        want = model(x).argmax(1)
    for fmt in ("fp16", "bf16"):
        got = deploy(model, fmt, x[:1], None, tmp_path)
        assert got(x).dtype == torch.float32
        assert (got(x).argmax(1) == want).float().mean() >= 0.95


@pytest.mark.slow
def test_int8_pt2e_equals_its_reference_and_the_projects_int8_twin(lenet, tmp_path: Path
                                                                   ) -> None:
    """Compiled INT8 kernels compute what the eager quantize/dequantize program says
    (within a few requantization steps: >= 98% same predictions), and the PT2E model
    predicts what the project's own INT8 fake-quant (per-channel weights, 8-bit
    activations calibrated on the same batches) does on >= 95% of the images."""
    model, x, y = lenet
    calibration = [x[i:i + 32] for i in range(0, 128, 32)]
    fast = deploy(model, "int8_pt2e", x[:1], calibration, tmp_path)
    reference = deploy(model, "int8_pt2e_eager", x[:1], calibration, tmp_path)
    got, ref = fast(x), reference(x)
    assert (got.argmax(1) == ref.argmax(1)).float().mean() >= 0.98
    scale = ref.abs().max()
    assert (got - ref).abs().max() <= 0.1 * scale
    twin = quant.quantize_(copy.deepcopy(model), quant.QuantConfig(
        weights=quant.IntFormat(8, True, per_channel=True),
        activations=quant.IntFormat(8, symmetric=False), observer="minmax"),
        calibration=calibration)
    with torch.no_grad():
        project = twin(x)
    assert (got.argmax(1) == project.argmax(1)).float().mean() >= 0.95
    acc = lambda logits: (logits.argmax(1) == y).float().mean().item()  # noqa: E731
    assert abs(acc(got) - acc(project)) <= 0.05
    assert fast.nbytes < deploy(model, "fp32", x[:1], None, tmp_path).nbytes
    loaded = torch.export.load(str(fast.files[0])).module()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x[:7]), ref[:7])  # the saved program, any batch


@pytest.mark.slow
def test_a_torchvision_resnet_quantizes_despite_its_shared_relu(tmp_path: Path) -> None:
    """torchvision's BasicBlock calls one ReLU module twice: the x86 quantizer refused it
    until each call got its own name."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="resnet18"), 3, 32, 2).eval()
    x = torch.randn(4, 3, 32, 32)
    deployed = deploy(model, "int8_pt2e_eager", x[:1], [x], tmp_path)
    with torch.no_grad():
        want = model(x)
    assert (deployed(x) - want).abs().max() <= 0.2 * want.abs().max()


def test_a_diverged_model_is_refused_by_name(lenet, tmp_path: Path) -> None:
    model = copy.deepcopy(lenet[0])
    with torch.no_grad():
        model.features[0].weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(DeployError, match=r"inf/NaN.*features\.0\.weight"):
        deploy(model, "onnx_fp32", lenet[1][:1], None, tmp_path, label="lenet")


class DataDependent(nn.Module):
    """Control flow on a tensor's value: torch.export cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return self.fc(x.flatten(1))
        return -self.fc(x.flatten(1))


@pytest.mark.parametrize("fmt", ["onnx_fp32", "int8_pt2e_eager"])
def test_an_untraceable_model_names_the_format_and_the_fallback(fmt: str, tmp_path: Path
                                                                 ) -> None:
    x = torch.randn(2, 1, 2, 2)
    with pytest.raises(DeployError, match=rf"mine: {fmt} failed .*fallback: fp32_compiled"):
        deploy(DataDependent(), fmt, x[:1], [x], tmp_path, label="mine")


def test_an_unknown_format_lists_the_allowed_ones(lenet, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown deployment format 'int4'.*allowed fp32"):
        deploy(lenet[0], "int4", lenet[1][:1], None, tmp_path)


def test_plain_copy_drops_the_training_hooks_and_keeps_the_rounded_weights(lenet) -> None:
    model, x, _ = lenet
    q = quant.quantize_(copy.deepcopy(model), quant.QuantConfig(
        weights=quant.IntFormat(4, True), activations=quant.IntFormat(8, False)),
        calibration=[x[:32]])
    plain = plain_copy(q)
    assert not quant.transforms.input_quantizers(plain)
    assert not plain.features[0]._forward_pre_hooks
    torch.testing.assert_close(plain.features[0].weight, q.features[0].weight)


def test_timing_helpers() -> None:
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([1.0, 2.0], 95) == pytest.approx(1.95)
    with pytest.raises(ValueError):
        percentile([], 50)
    model = nn.Conv2d(1, 4, 3).eval()
    x = torch.randn(1, 1, 16, 16)
    assert len(time_calls(model, x, 3)) == 3
    seconds, ratio = relative_latency(model, x, rounds=3)
    assert seconds > 0 and ratio > 0 and math.isfinite(ratio)
    with PeakRSS() as peak:
        # 256 MiB touched: more than the allocator keeps from earlier tests' frees.
        block = np.ones(256 << 20, dtype=np.uint8)
    assert peak.bytes >= 128 << 20
    del block


# -- the export stage inside a trial, its MLflow models in a real store ------------------
@pytest.fixture(scope="module")
def exported(tiny_root: Path, tmp_path_factory: pytest.TempPathFactory):
    """One quantized tiny trial exporting every ONNX format and INT8 PT2E, timed."""
    from trainables.loop import run_trial
    from trainables.sessions import LocalSession

    folder = tmp_path_factory.mktemp("exported")
    cfg = tiny_config(tiny_root, "train.epochs=1", "quant.mode=ptq",
                      "quant.per_channel=true", "data.cache_dir=" + str(folder / "cache"),
                      "export.formats=[fp32,int8_pt2e,onnx_fp32,onnx_int8]",
                      "export.latency=true")
    history = run_trial(cfg, LocalSession(checkpoint_dir=folder / "ckpt"))
    return history[-1], folder / "ckpt" / "artifacts"


@pytest.mark.slow
def test_the_export_stage_reports_every_format(exported) -> None:
    metrics, artifacts = exported
    for fmt in ("fp32", "int8_pt2e", "onnx_fp32", "onnx_int8"):
        assert 0.0 <= metrics[f"deploy_acc_{fmt}"] <= 1.0
        assert metrics[f"deploy_bytes_{fmt}"] > 0
        assert metrics[f"deploy_ms_{fmt}"] > 0 and metrics[f"deploy_rel_{fmt}"] > 0
    # The FP32 deployments are the quantized model's (the quant stage ran first).
    assert metrics["deploy_acc_fp32"] == metrics["deploy_acc_onnx_fp32"] == \
        metrics["test_acc_q"]
    report = json.loads((artifacts / "export.json").read_text())
    assert report["formats"]["onnx_int8"]["files"] == ["onnx_int8"]
    assert (artifacts / "model_int8.pt2").exists()
    for folder in ("onnx_fp32", "onnx_int8", "pytorch"):
        assert (artifacts / folder / "MLmodel").exists()


@pytest.mark.slow
def test_mlflow_models_load_back_from_a_real_store_and_predict_the_same(
        exported, tmp_path: Path, tiny_root: Path) -> None:
    import mlflow
    from mlflow.tracking import MlflowClient

    _, artifacts = exported
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment("deploy")).info.run_id
    for folder in ("onnx_fp32", "onnx_int8", "pytorch"):
        client.log_artifacts(run, str(artifacts / folder), folder)
    mlflow.set_tracking_uri(uri)
    x = np.random.default_rng(0).random((5, 1, 28, 28), dtype=np.float32)

    def predict(folder: str) -> np.ndarray:
        out = mlflow.pyfunc.load_model(f"runs:/{run}/{folder}").predict(x)
        return np.asarray(out["logits"] if isinstance(out, dict) else out)

    fp32, torch_fp32, int8 = predict("onnx_fp32"), predict("pytorch"), predict("onnx_int8")
    assert fp32.shape == (5, 10)
    np.testing.assert_allclose(fp32, torch_fp32, rtol=1e-4, atol=1e-5)
    local = mlflow.pyfunc.load_model(str(artifacts / "onnx_int8")).predict(x)
    np.testing.assert_array_equal(int8, np.asarray(local["logits"]))


def test_a_diverged_trial_exports_nan_and_says_why(tmp_path: Path) -> None:
    """The stage alone, on a model holding NaN: NaN metrics, the reason in export.json."""
    from trainables.stages.base import StageContext
    from trainables.stages.export import ExportStage

    cfg = TrialConfig().with_overrides(["export.formats=[fp32,onnx_int8]"])
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    with torch.no_grad():
        model[1].bias[0] = float("inf")
    ctx = StageContext(cfg=cfg, model=model, evaluate=None, splits=("test",),
                       train_batches=lambda n: iter([torch.zeros(2, 1, 2, 2)] * n),
                       eval_batches=None, data_shape=(1, 2, 2), out_dir=tmp_path,
                       is_chief=True, result=model)
    metrics = ExportStage(cfg).finalize(ctx)
    assert set(metrics) == {"deploy_acc_fp32", "deploy_bytes_fp32", "deploy_acc_onnx_int8",
                            "deploy_bytes_onnx_int8"}
    assert all(math.isnan(v) for v in metrics.values())
    assert "inf/NaN" in json.loads((tmp_path / "export.json").read_text())["not_exported"]


def _stage_context(cfg: TrialConfig, model: nn.Module, out: Path):
    """A StageContext around a model of 4 inputs (1 x 2 x 2 images), 2 classes, whose
    evaluate scores fixed data the way the loop does (eval mode, under autocast)."""
    from trainables.stages.base import StageContext

    x = torch.randn(16, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    y = (x.flatten(1).sum(1) > 0).long()

    def evaluate(m: nn.Module, split: str = "test") -> dict[str, float]:
        m.eval()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            logits = m(x)
        return {f"{split}_loss": 0.0, f"{split}_acc": (logits.argmax(1) == y).float().mean()
                .item()}

    return StageContext(cfg=cfg, model=model, evaluate=evaluate, splits=("test",),
                        train_batches=lambda n: iter([x[:8]] * n), eval_batches=None,
                        data_shape=(1, 2, 2), out_dir=out, is_chief=True, result=model)


def test_a_format_that_fails_leaves_the_others_and_says_why(tmp_path: Path) -> None:
    """Data-dependent control flow: eager FP32 deploys, ONNX cannot trace it. The FP32
    row is complete, the ONNX one NaN with its reason; the trial goes on."""
    from trainables.stages.export import ExportStage

    cfg = TrialConfig().with_overrides(["export.formats=[fp32,onnx_fp32]",
                                        "export.mlflow_models=false"])
    model = DataDependent()
    metrics = ExportStage(cfg).finalize(_stage_context(cfg, model, tmp_path))
    assert 0.0 <= metrics["deploy_acc_fp32"] <= 1.0 and metrics["deploy_bytes_fp32"] > 0
    assert math.isnan(metrics["deploy_acc_onnx_fp32"])
    assert math.isnan(metrics["deploy_bytes_onnx_fp32"])
    report = json.loads((tmp_path / "export.json").read_text())
    assert "onnx_fp32 failed" in report["formats"]["onnx_fp32"]["error"]
    assert "suggested fallback: fp32_compiled" in report["formats"]["onnx_fp32"]["error"]


def test_a_deployed_model_runs_in_its_own_precision_under_the_trials_autocast(
        tmp_path: Path) -> None:
    """The loop evaluates under autocast (amp_bf16): the FP32 deployment must not run in
    bf16. Its accuracy equals the model's own FP32 accuracy."""
    from trainables.stages.export import ExportStage

    cfg = TrialConfig().with_overrides(["export.formats=[fp32]",
                                        "export.mlflow_models=false"])
    torch.manual_seed(3)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 64), nn.ReLU(), nn.Linear(64, 2))
    ctx = _stage_context(cfg, model, tmp_path)
    seen = []
    model.register_forward_hook(lambda m, args, out: seen.append(out.dtype))
    ExportStage(cfg).finalize(ctx)
    assert seen and set(seen) == {torch.float32}


def test_pareto_front_leaves_out_rows_without_a_finite_cost() -> None:
    from sweeps.quant_bits import pareto_front

    rows = [{"trial_id": "a", "val_acc_q": 0.9, "packed_bytes": 100, "status": "FINISHED",
             "lat": 1.0},
            {"trial_id": "b", "val_acc_q": 0.99, "packed_bytes": 50, "status": "FINISHED",
             "lat": float("nan")},
            {"trial_id": "c", "val_acc_q": 0.95, "packed_bytes": 80, "status": "FINISHED"}]
    assert [r["trial_id"] for r in pareto_front(rows, cost="lat")] == ["a"]
    assert [r["trial_id"] for r in pareto_front(rows)] == ["b"]


def test_the_study_table_skips_a_format_that_failed_in_a_seed() -> None:
    from types import SimpleNamespace

    from sweeps.deploy_study import deploy_rows

    ok = {"deploy_acc_onnx_int8": 0.8, "deploy_bytes_onnx_int8": 100.0, "test_acc": 0.81}
    failed = {"deploy_acc_onnx_int8": float("nan"), "deploy_bytes_onnx_int8": float("nan"),
              "test_acc": 0.79}
    cell = SimpleNamespace(key=("resnet18", "fp32"), histories=[[ok], [failed]])
    rows = deploy_rows(SimpleNamespace(cells=[cell]))
    (onnx,) = [r for r in rows if r["format"] == "onnx_int8"]
    assert onnx == {"model": "resnet18", "training": "fp32", "format": "onnx_int8",
                    "test_acc": 0.8, "seeds": 1, "bytes": 100}
    (trained,) = [r for r in rows if r["format"] == "as trained"]
    assert trained["test_acc"] == 0.8 and trained["seeds"] == 2
    every = SimpleNamespace(key=("alexnet", "qat8"), histories=[[failed]])
    (row,) = [r for r in deploy_rows(SimpleNamespace(cells=[every]))
              if r["format"] == "onnx_int8"]
    assert row["test_acc"] == "failed" and row["seeds"] == 0
