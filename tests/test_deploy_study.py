"""sweeps/deploy_study.py as a researcher runs it: bad input before Ray, the training
folder it builds, and a smoke study whose runs hold the deployment tables and MLflow
models that load back."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from test_cli import run

SCRIPT = Path(__file__).resolve().parent.parent / "sweeps" / "deploy_study.py"


@pytest.mark.slow  # a subprocess each
@pytest.mark.parametrize("args, fragments", [
    (["--models", "vgg"], ["--models", "invalid choice", "resnet18"]),
    (["--seeds", "0"], ["--seeds=0", ">= 1"]),
    (["--set", "export.formats=[int4]"], ["export.formats[0]", "int4", "onnx_int8"]),
])
def test_bad_input_fails_before_any_ray_work(tmp_path: Path, tiny_root: Path,
                                             args: list[str], fragments: list[str]) -> None:
    out = run(args, tmp_path, tiny_root, timeout=120, script=SCRIPT)
    assert out.returncode == 2, out.stderr[-2000:]
    for fragment in fragments:
        assert fragment in out.stderr, out.stderr
    assert not (tmp_path / "ray_results").exists()


@pytest.mark.slow
def test_a_data_root_without_the_photos_is_refused(tmp_path: Path) -> None:
    out = run(["--smoke-test"], tmp_path, tmp_path / "empty", timeout=120, script=SCRIPT)
    assert out.returncode == 2
    assert "has no cats_vs_dogs/train" in out.stderr


def test_the_training_folder_adds_cifar_cats_and_dogs(tmp_path: Path) -> None:
    from sweeps.deploy_study import training_folder

    root = tmp_path / "data"
    for split, n in (("train", 3), ("test", 2)):
        for cls in ("cat", "dog"):
            folder = root / "cats_vs_dogs" / split / cls
            folder.mkdir(parents=True)
            for i in range(n):
                (folder / f"{i}.jpg").write_bytes(b"x")
    for cls in ("cat", "dog", "ship"):
        folder = root / "cifar10-jpeg" / "train" / cls
        folder.mkdir(parents=True)
        (folder / "0001.jpg").write_bytes(b"y")
    out = training_folder(root, tmp_path / "out", cifar=True)
    assert sorted(p.name for p in (out / "train").iterdir()) == ["cat", "dog"]
    assert len(list((out / "train" / "cat").iterdir())) == 4  # 3 photos + 1 CIFAR cat
    assert len(list((out / "test" / "dog").iterdir())) == 2  # the photos only
    again = training_folder(root, tmp_path / "out", cifar=True)  # idempotent
    assert len(list((again / "train" / "cat").iterdir())) == 4
    alone = training_folder(root, tmp_path / "alone", cifar=False)
    assert len(list((alone / "train" / "cat").iterdir())) == 3


@pytest.mark.ray
def test_smoke_study_logs_the_deployment_tables_and_models(tmp_path: Path,
                                                           tiny_root: Path) -> None:
    import mlflow
    import numpy as np

    out = run(["--smoke-test", "--address", "local"], tmp_path, tiny_root, timeout=900,
              script=SCRIPT)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "model x training x format" in out.stdout
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("deploy").experiment_id])
    (study,) = [r for r in runs if r.data.tags.get("kind") == "study"]
    assert study.info.status == "FINISHED"
    files = {a.path for a in client.list_artifacts(study.info.run_id)}
    assert {"deploy.md", "deploy.table.csv", "latency.md", "comparison.md"} <= files
    trials = [r for r in runs if "deploy_acc_int8_pt2e" in r.data.metrics]
    assert {t.data.params["quant.mode"] for t in trials} == {"none", "qat"}
    for trial in trials:
        names = {a.path for a in client.list_artifacts(trial.info.run_id)}
        assert {"pytorch", "model_int8.pt2", "export.json"} <= names
    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model(f"runs:/{trials[0].info.run_id}/pytorch")
    assert np.asarray(model.predict(np.zeros((2, 3, 32, 32), np.float32))).shape == (2, 2)
