"""What one finished run leaves for its user: pictures, per-class metrics, a servable model.

One short training (2,000 images, one epoch: about 90% test accuracy), run in the test's
process, is shared by most tests here; each then looks at it the way a user would: MLflow's
client, `mlflow.pyfunc` and `mnist-predict` (`mlflow models serve`: tests/test_own_model.py).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.abc
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import mlflow.pyfunc
import numpy as np
import pytest
import torch
from conftest import SMALL, copy_store, in_process, mlflow_uri, runs_in
from mlflow.tracking import MlflowClient
from PIL import Image

from mnist_exp import predict
from mnist_exp.api import train
from mnist_exp.training.data import load
from mnist_exp.training.networks import ConvNet

TEST_IMAGES = 500


@dataclass(frozen=True)
class Trained:
    run_id: str
    uri: str
    images: np.ndarray  # the run's test images, uint8 N x 28 x 28
    labels: np.ndarray


@pytest.fixture(scope="module")
def trained(
    tmp_path_factory: pytest.TempPathFactory, data_root: Path, empty_store: Path
) -> Trained:
    """`mnist-train` on 2,000 images for one epoch, with a small validation split."""
    tmp = tmp_path_factory.mktemp("trained")
    uri = copy_store(empty_store, f"sqlite:///{tmp}/mlruns/mlflow.db")
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        run = train(
            [f"data.root={data_root}", f"mlflow.tracking_uri={uri}", f"hydra.run.dir={tmp}/run",
             "trainer.epochs=1", "data.max_train_samples=2000", "data.val_size=300",
             f"data.max_test_samples={TEST_IMAGES}"]
        )  # fmt: skip
    assert run.status == "FINISHED"
    test = load("torchvision.datasets.MNIST", str(data_root), max_test_samples=TEST_IMAGES).test
    return Trained(run.run_id, uri, test.images[:, 0].numpy(), test.labels.numpy())


@pytest.fixture(scope="module")
def pyfunc(trained: Trained) -> mlflow.pyfunc.PyFuncModel:
    with mlflow_uri(trained.uri):
        return mlflow.pyfunc.load_model(f"runs:/{trained.run_id}/model")


@pytest.mark.slow
def test_the_run_holds_three_valid_pictures(trained: Trained, tmp_path: Path):
    client = MlflowClient(trained.uri)
    listed = {a.path for a in client.list_artifacts(trained.run_id, "plots")}
    names = ("learning_curves.png", "confusion_matrix.png", "misclassified.png")
    assert listed == {f"plots/{name}" for name in names}
    folder = Path(client.download_artifacts(trained.run_id, "plots", str(tmp_path)))
    for name in names:
        with Image.open(folder / name) as image:
            assert image.format == "PNG"
            assert image.width >= 300 and image.height >= 300, name
            pixels = np.asarray(image.convert("L"))
        assert pixels.std() > 10, f"{name} is blank"


@pytest.mark.slow
def test_per_class_accuracy_adds_up_to_the_test_accuracy(trained: Trained):
    metrics = MlflowClient(trained.uri).get_run(trained.run_id).data.metrics
    per_class = [metrics[f"test_accuracy_class_{k}"] for k in range(10)]
    assert all(0 <= a <= 1 for a in per_class)
    counts = np.bincount(trained.labels, minlength=10)
    weighted = float(np.dot(per_class, counts)) / counts.sum()
    assert weighted == pytest.approx(metrics["test_accuracy"], abs=1e-9)
    assert metrics["test_accuracy"] > 0.8  # the pictures and the CLI tests need a fair model


@pytest.mark.slow
def test_the_logged_model_predicts_raw_pixels_like_the_checkpoint(
    trained: Trained, pyfunc, tmp_path: Path
):
    images = trained.images[:50]
    result = pyfunc.predict(images.astype(np.float32))
    assert list(result.columns) == ["label", "probability", "probabilities"]
    probabilities = np.stack(result["probabilities"])
    assert probabilities.shape == (50, 10)
    np.testing.assert_allclose(probabilities.sum(1), 1, atol=1e-6)
    np.testing.assert_allclose(result["probability"], probabilities.max(1))

    # The same weights through the training code's own normalisation give the same answer.
    client = MlflowClient(trained.uri)
    path = client.download_artifacts(trained.run_id, "checkpoints/model.ckpt", str(tmp_path))
    net = ConvNet().eval()
    net.load_state_dict(torch.load(path, weights_only=True))
    with torch.no_grad():
        expected = torch.softmax(net(torch.from_numpy(images).float()[:, None] / 255), 1)
    np.testing.assert_allclose(probabilities, expected.numpy(), atol=1e-5)
    assert (result["label"].to_numpy() == trained.labels[:50]).mean() > 0.7

    signature = pyfunc.metadata.signature
    (spec,) = signature.inputs.inputs
    assert (spec.type, spec.shape) == (np.dtype("float32"), (-1, 28, 28))
    assert pyfunc.metadata.saved_input_example_info is not None


class _NoTorch(importlib.abc.MetaPathFinder):
    """Refuses, and notes, every import of torch while torch is out of `sys.modules`."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    def find_spec(self, name, path, target=None):
        if name.split(".")[0] == "torch":
            self.asked.append(name)
            raise ImportError(f"{name} imported while saving the model")
        return None


def test_saving_the_model_imports_no_torch(tmp_path: Path, monkeypatch):
    """The tracker saves the model: without torch it stays small and quick (issue 5).

    torch is taken out of `sys.modules` while the saving code is imported and run afresh, so
    that any import of torch reaches a finder that notes it, as in a process without torch.
    """
    weights = tmp_path / "model.ckpt"
    torch.save(ConvNet().state_dict(), weights)
    guard = _NoTorch()
    fresh = ("mnist_exp.report.serving", "mnist_exp.report.model_spec")
    with monkeypatch.context() as patch:
        for name in [m for m in sys.modules if m.split(".")[0] == "torch" or m in fresh]:
            patch.delitem(sys.modules, name)
        patch.setattr(sys, "meta_path", [guard, *sys.meta_path])
        serving = importlib.import_module("mnist_exp.report.serving")
        spec = importlib.import_module("mnist_exp.report.model_spec").ModelSpec(
            "mnist_exp.models.ConvNet", {"num_classes": 10}, (1, 28, 28), np.zeros((2, 28, 28))
        )
        with contextlib.suppress(ImportError):  # named below
            serving.save(tmp_path / "model", weights, spec)
    assert guard.asked == [], "saving the model imported torch"
    loaded = mlflow.pyfunc.load_model(str(tmp_path / "model"))
    assert len(loaded.predict(np.zeros((3, 28, 28), np.float32))) == 3


@pytest.mark.slow
def test_without_a_terminal_plain_lines_and_a_summary(mnist_train, tracking_uri, tmp_path):
    ended = mnist_train(*SMALL, "mlflow.log_model=true")
    assert ended.code == 0, ended.err
    (run,) = runs_in(tracking_uri)
    run_id, run_dir, out = run.info.run_id, tmp_path / "run", ended.out
    assert "Test Accuracy of the model on the 200 test images: " in out
    assert "Epoch [2/2] done: " in out
    assert "images/s" not in out + ended.err  # no progress bar
    summary = out[out.index(f"Run {run_id}") :]
    assert f"checkpoint     {run_dir / 'model.ckpt'}" in summary
    assert (run_dir / "model.ckpt").is_file()
    assert f"test accuracy  {run.data.metrics['test_accuracy']:.2%}" in summary
    assert f"model          runs:/{run_id}/model" in summary
    assert f"MLFLOW_TRACKING_URI={tracking_uri} bash " in summary
    assert re.search(rf"http://127\.0\.0\.1:5000/#/experiments/\d+/runs/{run_id}", summary)


# mnist-predict


def _well_classified(trained: Trained, pyfunc, n: int) -> list[int]:
    """Indices of test images the model gets right with confidence, one per class."""
    result = pyfunc.predict(trained.images.astype(np.float32))
    chosen: dict[int, int] = {}
    for i, (label, p) in enumerate(zip(result["label"], result["probability"], strict=True)):
        if label == trained.labels[i] and p > 0.9 and label not in chosen:
            chosen[int(label)] = i
    assert len(chosen) >= n
    return list(chosen.values())[:n]


@pytest.mark.slow
def test_mnist_predict_reads_digits_of_any_size_and_background(
    trained: Trained, pyfunc, tmp_path: Path, capfd
):
    files, digits = [], []
    for i in _well_classified(trained, pyfunc, 4):
        raw = tmp_path / f"mnist-{i}.png"
        Image.fromarray(trained.images[i]).save(raw)
        # Dark ink on white paper, three times the size, in colour: as a user might draw it.
        paper = Image.fromarray(255 - trained.images[i]).resize((84, 84), Image.Resampling.BICUBIC)
        drawn = tmp_path / f"drawn-{i}.png"
        paper.convert("RGB").save(drawn)
        files += [raw, drawn]
        digits += [int(trained.labels[i])] * 2
    argv = [trained.run_id, *map(str, files), "--tracking-uri", trained.uri]
    ended = in_process(predict.main, argv, capfd)
    assert ended.code == 0, ended.err
    lines = ended.out.strip().splitlines()
    assert len(lines) == len(files)
    for line, path, digit in zip(lines, files, digits, strict=True):
        match = re.fullmatch(rf"{re.escape(str(path))}: (\d) \((\d+\.\d)%\)", line)
        assert match, line
        assert int(match[1]) == digit, line
        assert 10 <= float(match[2]) <= 100


@pytest.mark.slow
@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("unknown-run", "error: no MLflow run '0123456789abcdef' in sqlite:///"),
        ("missing-file", "error: {tmp}/nothing.png: no such file"),
        ("not-an-image", "error: {tmp}/notes.png is not an image file"),
    ],
)
def test_mnist_predict_refuses_bad_input_in_one_line(
    trained: Trained, tmp_path: Path, case: str, expected: str, capfd
):
    image = tmp_path / "seven.png"
    Image.fromarray(trained.images[0]).save(image)
    (tmp_path / "notes.png").write_text("not a picture")
    run_id, path = {
        "unknown-run": ("0123456789abcdef", image),
        "missing-file": (trained.run_id, tmp_path / "nothing.png"),
        "not-an-image": (trained.run_id, tmp_path / "notes.png"),
    }[case]
    ended = in_process(predict.main, [run_id, str(path), "--tracking-uri", trained.uri], capfd)
    assert ended.code == 1
    assert ended.out == ""
    lines = ended.err.strip().splitlines()
    assert len(lines) == 1, ended.err
    assert lines[0].startswith(expected.format(tmp=tmp_path)), lines[0]
