"""A model of one's own, trained on a folder of one's own images, as a user does it.

One sweep trains a network defined in a temporary package outside mnist_exp (importable only
for training) on MNIST digits written as PNGs into class folders named after the digits, at
24x24 pixels rather than MNIST's 28; the best run is rerun. Then the package is deleted, and
the tests use what the runs left: MLflow 3's logged models, the Model Registry
(`mnist-compare --register`), `mnist-predict models:/NAME/latest` and `mlflow models serve`
answering an HTTP request. The commands run in the test's process but the model server.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import mlflow.pyfunc
import numpy as np
import pytest
from conftest import Uncaptured, copy_store, in_process, mlflow_uri, runs_in, served_predictions
from mlflow.tracking import MlflowClient
from PIL import Image

from mnist_exp import api, compare, predict, rerun
from mnist_exp import train as mnist_train
from mnist_exp.training.data import load

pytestmark = pytest.mark.slow  # a sweep of two runs, a rerun, a model server
NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SIZE = 24  # data.image_size: not MNIST's 28, so nothing may assume it
PACKAGE = "my_nets"
# The user's own network: any input size and channels, told only the number of classes.
NETWORK = '''
from torch import nn


class TinyNet(nn.Module):
    """Two convolutions and a linear layer on whatever size the images have."""

    def __init__(self, num_classes: int, width: int = 16) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4),
        )
        self.classify = nn.Linear(width * 16, num_classes)

    def forward(self, x):
        return self.classify(self.features(x).flatten(1))
'''


@dataclass(frozen=True)
class Swept:
    uri: str
    parent_id: str
    best_id: str
    images: Path  # the image folder
    test_files: list[Path]  # PNGs of test images, with their classes' names
    test_names: list[str]


@pytest.fixture(scope="module")
def swept(tmp_path_factory: pytest.TempPathFactory, data_root: Path, empty_store: Path) -> Swept:
    tmp = tmp_path_factory.mktemp("own")
    code = tmp / "code"
    (code / PACKAGE).mkdir(parents=True)
    (code / PACKAGE / "__init__.py").write_text(textwrap.dedent(NETWORK))
    mnist = load(
        "torchvision.datasets.MNIST", str(data_root), max_train_samples=1000, max_test_samples=100
    )
    files, names = [], []
    for split, data in (("train", mnist.train), ("test", mnist.test)):
        for n, (image, label) in enumerate(zip(data.images, data.labels, strict=True)):
            path = tmp / "images" / split / NAMES[int(label)] / f"{n}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image[0].numpy()).save(path)
            if split == "test":
                files.append(path)
                names.append(NAMES[int(label)])
    uri = copy_store(empty_store, f"sqlite:///{tmp}/mlruns/mlflow.db")
    with pytest.MonkeyPatch.context() as patch:
        # As `PYTHONPATH=code mnist-train ...`: for this process and its tracker.
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        patch.setenv("PYTHONPATH", os.pathsep.join([str(code), os.environ.get("PYTHONPATH", "")]))
        patch.syspath_prepend(str(code))
        sweep = in_process(
            mnist_train.run_command,
            ["-m", "optimizer.lr=0.003,0.01", "data=image_folder", f"data.root={tmp / 'images'}",
             f"data.image_size={SIZE}", f"data.cache_dir={tmp / 'cache'}",
             f"model._target_={PACKAGE}.TinyNet", "trainer.epochs=3",
             "trainer.print_every_n_steps=0", f"mlflow.tracking_uri={uri}",
             f"hydra.sweep.dir={tmp}/sweep", "mlflow.log_plots=false"],
            Uncaptured(),
        )  # fmt: skip
        assert sweep.code == 0, sweep.err
        runs = runs_in(uri)
        (parent,) = [r for r in runs if r.data.tags.get("mnist_exp.sweep") == "true"]
        best = parent.data.tags["mnist_exp.best_run_id"]

        # The rerun trains the same network again, exactly; it needs the package, as training
        # does.
        argv = [best, f"hydra.run.dir={tmp}/rerun", f"mlflow.tracking_uri={uri}"]
        again = in_process(rerun.main, argv, Uncaptured())
        assert again.code == 0, again.err
    sys.modules.pop(PACKAGE)  # as in a process that never imported it
    (rerun_run,) = [r for r in runs_in(uri) if r.data.tags.get("mnist_exp.rerun_of") == best]
    original = MlflowClient(uri).get_run(best).data.metrics
    assert rerun_run.data.metrics["test_accuracy"] == original["test_accuracy"]

    shutil.rmtree(code)  # from here on, the models must carry the network's code
    return Swept(uri, parent.info.run_id, best, tmp / "images", files, names)


def test_each_run_is_an_mlflow_3_logged_model_with_its_metrics_and_per_class_names(
    swept: Swept,
):
    client = MlflowClient(swept.uri)
    run = client.get_run(swept.best_id)
    assert run.data.params["model._target_"] == "my_nets.TinyNet"
    assert {f"test_accuracy_class_{name}" for name in NAMES} <= set(run.data.metrics)
    (model,) = client.search_logged_models(
        experiment_ids=[run.info.experiment_id],
        filter_string=f"source_run_id = '{swept.best_id}'",
    )
    assert model.name == "model" and model.status.to_proto() == 2  # READY
    linked = {m.key: m.value for m in model.metrics}
    assert linked["test_accuracy"] == run.data.metrics["test_accuracy"]
    assert linked["test_accuracy_class_seven"] == run.data.metrics["test_accuracy_class_seven"]
    assert run.outputs.model_outputs[0].model_id == model.model_id
    with mlflow_uri(swept.uri):  # MLflow lists a logged model's files on its global store
        files = {a.path for a in client.list_artifacts(swept.best_id, "model/code")}
    assert files == {"model/code/mnist_exp", "model/code/my_nets"}


def test_the_best_model_registers_and_predicts_by_name_without_the_package(swept: Swept, capfd):
    argv = [swept.parent_id, "--register", "digits", "--alias", "champion"]
    done = in_process(compare.main, [*argv, "--tracking-uri", swept.uri], capfd)
    assert done.code == 0, done.err
    assert f"registered digits version 1: the model of run {swept.best_id}" in done.out
    assert "load it as models:/digits/1, models:/digits@champion or models:/digits/latest" in (
        done.out
    )
    client = MlflowClient(swept.uri)
    (version,) = client.search_model_versions("name = 'digits'")
    best = client.get_run(swept.best_id)
    accuracy = best.data.metrics["test_accuracy"]
    (trained_on,) = [
        i.dataset.digest for i in best.inputs.dataset_inputs if i.dataset.name == "images-train"
    ]
    assert version.run_id == swept.best_id
    assert version.tags == {
        "mnist_exp.run_id": swept.best_id,
        "mnist_exp.metric": "test_accuracy",
        "mnist_exp.metric_value": str(accuracy),
        "mnist_exp.test_accuracy": str(accuracy),
        "mnist_exp.train_data_digest": trained_on,
    }
    assert int(client.get_model_version_by_alias("digits", "champion").version) == 1
    # From Python: a second version, chosen by another metric, under another alias.
    second = api.register(
        "digits", swept.parent_id, alias="challenger", metric="test_loss", tracking_uri=swept.uri
    )
    assert int(second.version) == 2 and second.aliases == ["challenger"]
    assert int(client.get_model_version_by_alias("digits", "challenger").version) == 2
    assert int(client.get_model_version_by_alias("digits", "champion").version) == 1
    assert second.tags["mnist_exp.metric"] == "test_loss"
    refused = in_process(compare.main, [swept.parent_id, "--alias", "champion"], capfd)
    assert refused.code == 2 and "add --register" in refused.err

    files, names = swept.test_files[:40], swept.test_names[:40]
    assert PACKAGE not in sys.modules
    argv = ["models:/digits@champion", *map(str, files), "--tracking-uri", swept.uri]
    shown = in_process(predict.main, argv, capfd)
    assert shown.code == 0, shown.err
    lines = shown.out.strip().splitlines()
    predicted = [
        re.fullmatch(rf"{re.escape(str(f))}: (\w+) \(\d+\.\d%\)", line)
        for f, line in zip(files, lines, strict=True)
    ]
    assert all(predicted), lines
    right = sum(m[1] == name for m, name in zip(predicted, names, strict=True) if m)
    assert right >= 0.7 * len(files), lines


@pytest.mark.process
def test_mlflow_models_serve_answers_with_the_class_names(swept: Swept):
    """The one test of a served model (the ConvNet's is served alike): labels and
    probabilities in JSON, from a process that cannot import the package."""
    # The images as the model takes them: converted as mnist-predict does, at 24x24.
    from mnist_exp.training.images import mnist_pixels, read_image

    pixels = np.stack([mnist_pixels(read_image(f), SIZE)[0] for f in swept.test_files[:20]])
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # no package on the path
    env["MLFLOW_TRACKING_URI"] = swept.uri
    answer = served_predictions(f"runs:/{swept.best_id}/model", env, pixels)
    labels = [row["label"] for row in answer]
    assert set(labels) <= set(NAMES)
    right = sum(label == name for label, name in zip(labels, swept.test_names, strict=False))
    assert right >= 0.7 * len(labels), labels
    with mlflow_uri(swept.uri):
        model = mlflow.pyfunc.load_model(f"runs:/{swept.best_id}/model")
    assert labels == model.predict(pixels)["label"].tolist()
    for row in answer:
        assert sum(row["probabilities"]) == pytest.approx(1, abs=1e-6)
