"""`mnist-train --help`: the project's groups, keys and commands, not Hydra's generic text."""

from __future__ import annotations

import re

from conftest import in_process

from mnist_exp import train


def test_help_shows_the_groups_the_keys_and_examples(capfd, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    # With an override, as a user checks what it changes: the text follows it.
    ended = in_process(train.run_command, ["--help", "optimizer=sgd", "optimizer.lr=0.05"], capfd)
    assert ended.code == 0, ended.err
    text = ended.out
    assert text.startswith("mnist-train: train the MNIST ConvNet")
    assert "powered by Hydra" not in text
    groups = dict(
        re.findall(r"^(\S+) +(\S.*)$", text.split("== Config groups")[1].split("\n\n")[0], re.M)
    )
    assert groups["optimizer"] == "sgd (in use), adam, adamw"
    assert groups["model"] == "convnet (in use), wide_convnet"
    assert groups["scheduler"] == "none (in use), onecycle"
    assert groups["hydra/launcher"].startswith("basic (in use), joblib")
    assert {"data", "device", "experiment", "hparams_search", "mlflow", "trainer"} <= set(groups)
    assert "base_" not in text.split("== The whole config")[0]  # the schemas are no options
    assert re.search(r"^optimizer\.lr +learning rate \(0\.05\)$", text, re.M)
    for example in (
        "mnist-train optimizer=sgd optimizer.lr=0.05 trainer.epochs=3",  # a run
        "mnist-train -m optimizer.lr=0.001,0.003 data.batch_size=64,128",  # a sweep
        "mnist-train -m hparams_search=optuna",  # a search
        "mnist-rerun RUN_ID",  # a rerun
    ):
        assert f"\n{example}" in text, example
    assert "\n  lr: 0.05\n" in text  # the whole composed config closes it
    assert text.rstrip().endswith("mnist-train --hydra-help")
