"""What data a run saw: each split an MLflow dataset input (training, validation, testing) with
a digest of exactly its images and labels; a rerun on changed data says so; a registered model
version carries its training data's digest. Runs go in the test's process, on tiny data."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import in_process, only_run
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from PIL import Image

from mnist_exp import api, compare, rerun
from mnist_exp.tracking.datasets import DataSplit
from mnist_exp.tracking.mlflow_run import MlflowRun
from mnist_exp.training.data import digest, load

MNIST = "torchvision.datasets.MNIST"
TINY = (
    "trainer.epochs=1",
    "trainer.print_every_n_steps=0",
    "mlflow.log_plots=false",
    "mlflow.log_model=false",
)


def _train(uri: str, folder: Path, *overrides: str) -> str:
    """A run of `overrides` on tiny data in `folder`; its run id."""
    where = [f"mlflow.tracking_uri={uri}", f"hydra.run.dir={folder}"]
    return api.train([*where, *TINY, *overrides]).run_id


def _inputs(uri: str, run_id: str) -> dict[str, tuple[str, str, dict]]:
    """The run's dataset inputs by context: name, digest, profile."""
    found = {}
    for given in MlflowClient(uri).get_run(run_id).inputs.dataset_inputs:
        (context,) = [t.value for t in given.tags if t.key == "mlflow.data.context"]
        dataset = given.dataset
        found[context] = (dataset.name, dataset.digest, json.loads(dataset.profile))
    return found


def test_runs_on_the_same_data_record_the_same_digests_of_each_split(
    data_root, tracking_uri, tmp_path, monkeypatch
):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    data = [f"data.root={data_root}", "data.max_train_samples=48", "data.max_test_samples=24"]
    data.append("data.val_size=16")
    first = _inputs(tracking_uri, _train(tracking_uri, tmp_path / "a", *data))
    second = _inputs(tracking_uri, _train(tracking_uri, tmp_path / "b", *data))
    assert first == second
    sizes = {context: (name, profile["images"]) for context, (name, _, profile) in first.items()}
    assert sizes == {
        "training": ("mnist-train", 48),
        "validation": ("mnist-val", 16),
        "testing": ("mnist-test", 24),
    }
    assert first["training"][2] == {
        "dataset": MNIST,
        "images": 48,
        "classes": [str(k) for k in range(10)],
    }
    # Exactly the images used: after the validation split and max_*_samples.
    loaded = load(MNIST, str(data_root), val_size=16, max_train_samples=48, max_test_samples=24)
    assert first["training"][1] == digest(loaded.train)
    assert first["validation"][1] == digest(loaded.val)
    assert first["testing"][1] == digest(loaded.test)
    assert (
        digest(load(MNIST, str(data_root), val_size=16, max_train_samples=47).train)
        != (first["training"][1])
    )


def test_a_rerun_after_one_image_changed_says_which_split_differs(
    data_root, tracking_uri, tmp_path, capfd, monkeypatch
):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    mnist = load(MNIST, str(data_root), max_train_samples=40, max_test_samples=20)
    folder = tmp_path / "digits"
    for split, part in (("train", mnist.train), ("test", mnist.test)):
        for n, (image, label) in enumerate(zip(part.images, part.labels, strict=True)):
            path = folder / split / f"digit{int(label)}" / f"{n}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image[0].numpy()).save(path)
    where = ["data=image_folder", f"data.root={folder}", "data.cache_dir=null"]
    run_id = _train(tracking_uri, tmp_path / "run", *where)
    before = _inputs(tracking_uri, run_id)
    assert {context: name for context, (name, _, _) in before.items()} == {
        "training": "digits-train",
        "testing": "digits-test",
    }
    classes = sorted(f"digit{k}" for k in set(mnist.train.labels.tolist()))  # the folders
    assert before["testing"][2]["classes"] == classes

    # The same data: the rerun says nothing of them.
    argv = [run_id, f"hydra.run.dir={tmp_path}/same", f"mlflow.tracking_uri={tracking_uri}"]
    same = in_process(rerun.main, argv, capfd)
    assert same.code == 0, same.err
    assert "data differ" not in same.out + same.err

    changed = next((folder / "test").rglob("*.png"))
    Image.fromarray(255 - mnist.test.images[0, 0].numpy()).save(changed)
    argv = [run_id, f"hydra.run.dir={tmp_path}/rerun", f"mlflow.tracking_uri={tracking_uri}"]
    again = in_process(rerun.main, argv, capfd)
    assert again.code == 0, again.err
    rerun_run = only_run(tracking_uri, **{"mnist_exp.output_dir": str(tmp_path / "rerun")})
    after = _inputs(tracking_uri, rerun_run.info.run_id)
    assert after["training"][1] == before["training"][1]
    assert after["testing"][1] != before["testing"][1]
    (line,) = [x for x in (again.out + again.err).splitlines() if "data differ" in x]
    assert line == (
        f"warning: the data differ from what run {run_id} used, by digest: testing "
        f"({after['testing'][1]} here, {before['testing'][1]} recorded); results may differ"
    )


def test_a_registered_version_carries_its_training_data_digest(
    data_root, tracking_uri, tmp_path, monkeypatch
):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    data = [f"data.root={data_root}", "data.max_train_samples=32", "data.max_test_samples=16"]
    run_id = _train(tracking_uri, tmp_path / "run", *data, "mlflow.log_model=true")
    client = MlflowClient(tracking_uri)
    _, version = compare.register_best(client, [client.get_run(run_id)], "test_accuracy", "digits")
    trained_on = _inputs(tracking_uri, run_id)["training"][1]
    assert version.tags["mnist_exp.train_data_digest"] == trained_on


def test_a_dataset_a_parallel_job_stored_meanwhile_is_found_on_the_next_try(
    tracking_uri, monkeypatch
):
    """A sweep's parallel jobs store the same dataset at once: MLflow's insert fails on its key
    in all but the first (seen with 4 processes on SQLite); the run must not fail for it."""
    client = MlflowClient(tracking_uri)
    run = MlflowRun(client, client.create_run(client.create_experiment("x")).info, {})
    split = DataSplit("training", "mnist-train", MNIST, "/data", "0123abcd", 8, [1, 28, 28], ["0"])
    stored, tries = client.log_inputs, []

    def after_another_job(*args, **kwargs) -> None:
        tries.append(args)
        if len(tries) == 1:
            raise MlflowException("UNIQUE constraint failed: datasets.experiment_id, ...")
        stored(*args, **kwargs)

    monkeypatch.setattr(client, "log_inputs", after_another_job)
    run.log_datasets([split])
    assert len(tries) == 2
    assert _inputs(tracking_uri, run.run_id)["training"][:2] == ("mnist-train", "0123abcd")
