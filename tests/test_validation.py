"""Values that cannot work are refused with one line naming the key.

A wrong type or an unknown key is refused by the schema while Hydra composes the config
(`compose_config`, or the command's `@hydra.main`); a value of the right type outside its
range by `check_config`. Both answer in the same one-line form.
"""

from pathlib import Path

import pytest
from conftest import in_process
from omegaconf import OmegaConf

from mnist_exp import train
from mnist_exp.config.checks import check_config, check_overrides
from mnist_exp.config.paths import CONF_DIR, compose_config
from mnist_exp.errors import UserError


def _check(overrides: list[str]) -> None:
    """What `mnist-train` does with its overrides before it builds anything."""
    check_overrides(overrides)
    check_config(compose_config(overrides))


def _refusal(overrides: list[str]) -> str:
    with pytest.raises(UserError) as info:
        _check(overrides)
    message = str(info.value)
    assert "\n" not in message and len(message) < 400, message
    assert message.rstrip().endswith(("conf/", "instead")) or "name one of" in message, message
    return message


BAD = [
    ("optimizer.lr=0", "optimizer.lr"),
    ("optimizer.lr=-0.1", "optimizer.lr"),
    ("optimizer.lr=fast", "optimizer.lr"),
    ("data.batch_size=0", "data.batch_size"),
    ("data.batch_size=1.5", "data.batch_size"),
    ("data.eval_batch_size=0", "data.eval_batch_size"),
    ("data.val_size=-1", "data.val_size"),
    ("data.max_train_samples=0", "data.max_train_samples"),
    ("trainer.epochs=-1", "trainer.epochs"),
    ("trainer.epochs=abc", "trainer.epochs"),
    ("trainer.seed=-3", "trainer.seed"),
    ("trainer.log_every_n_steps=0", "trainer.log_every_n_steps"),
    ("trainer.precision=16", "trainer.precision"),
    ("trainer.label_smoothing=1", "trainer.label_smoothing"),
    ("model=wide_convnet model.channels=[32]", "model.channels"),
    ("model=wide_convnet model.channels=[0,64]", "model.channels"),
    ("model=wide_convnet model.channels=[a,64]", "model.channels"),
    ("model=wide_convnet model.dropout=1.5", "model.dropout"),
    ("data.max_rotation=-5", "data.max_rotation"),
    ("data.max_rotation=200", "data.max_rotation"),
    ("data.max_scale=1", "data.max_scale"),
    ("data.root=null", "data.root"),
    ("trainer.label_smoothing=-0.1", "trainer.label_smoothing"),
    ("device.type=tpu", "device.type"),
    ("model.num_classes=1", "model.num_classes"),
    ("model.num_classes=ten", "model.num_classes"),
    ("trainer.compile=maybe", "trainer.compile"),
    ("trainer.compile=yes", "trainer.compile"),
    ("trainer.cuda_graph=2", "trainer.cuda_graph"),
    ("trainer.channels_last=1", "trainer.channels_last"),
    ("trainer.progress_bar=0", "trainer.progress_bar"),
    ("optimizer.fused=1", "optimizer.fused"),
    ("mlflow.tags=[a]", "mlflow.tags"),
    ("mlflow.request_timeout_s=soon", "mlflow.request_timeout_s"),
    ("mlflow.request_timeout_s=0", "mlflow.request_timeout_s"),
    ("mlflow.request_max_retries=-1", "mlflow.request_max_retries"),
    ("mlflow.retry_for_s=-5", "mlflow.retry_for_s"),
    ("optimized_metric=accuracy", "optimized_metric"),
    ("optimized_metric=[1]", "optimized_metric"),
    ("trainer.monitor=test_accuracy", "trainer.monitor"),
    ("trainer.monitor=accuracy", "trainer.monitor"),
    ("trainer.early_stopping.patience=0", "trainer.early_stopping.patience"),
    ("trainer.early_stopping.patience=soon", "trainer.early_stopping.patience"),
    ("trainer.early_stopping.patience=3", "trainer.early_stopping.patience"),  # no split
    ("trainer.early_stopping.min_delta=-0.1", "trainer.early_stopping.min_delta"),
    ("trainer.test_best=2", "trainer.test_best"),
]


@pytest.mark.parametrize(("override", "key"), BAD, ids=[b[0] for b in BAD])
def test_bad_value_is_refused_naming_the_key(override: str, key: str) -> None:
    message = _refusal(override.split())
    assert message.startswith(f"{key}="), message
    assert "must" in message


@pytest.mark.parametrize(
    ("override", "key", "suggestion"),
    [
        ("trainer.epoch=3", "trainer.epoch", "trainer.epochs"),  # a typo
        ("+trainer.epoch=3", "trainer.epoch", "trainer.epochs"),  # `+` cannot add one either
        ("data.batchsize=32", "data.batchsize", "data.batch_size"),
        ("+mlflow.trackinguri=x", "mlflow.trackinguri", "mlflow.tracking_uri"),
        ("optimised_metric=val_loss", "optimised_metric", "optimized_metric"),
        ("model.num_clases=3", "model.num_clases", "model.num_classes"),
        ("optimizer.learning_rate=0.1", "optimizer.learning_rate", None),
    ],
)
def test_unknown_key_is_refused_in_one_line_naming_it(
    override: str, key: str, suggestion: str | None
) -> None:
    message = _refusal([override])
    assert message.startswith(f"{key} is not a config key"), message
    if suggestion:
        assert f"did you mean {suggestion}?" in message


def test_a_wrong_type_in_an_option_file_names_the_key_and_the_file(tmp_path: Path) -> None:
    (tmp_path / "experiment").mkdir()
    (tmp_path / "experiment" / "mine.yaml").write_text(
        "# @package _global_\ntrainer:\n  epochs: many\n"
    )
    searchpath = f"hydra.searchpath=[file://{tmp_path}]"
    message = _refusal([searchpath, "experiment=mine"])
    assert message.startswith("trainer.epochs='many' must be a whole number (in experiment/mine)")
    (tmp_path / "experiment" / "mine.yaml").write_text(
        "# @package _global_\ntrainer:\n  epoch: 3\n"
    )
    assert _refusal([searchpath, "experiment=mine"]).startswith("trainer.epoch is not a config")


def test_a_users_own_model_keeps_its_own_keys(tmp_path: Path) -> None:
    """The model group types the keys of our models and stays open to other arguments."""
    cfg = compose_config(["model._target_=my.Net", "+model.hidden=128"])
    check_config(cfg)
    assert OmegaConf.to_container(cfg.model, resolve=True) == {
        "_target_": "my.Net",
        "num_classes": 10,
        "image_size": 28,  # given to my.Net only if it takes it (tests/test_image_folder.py)
        "in_channels": 1,  # likewise
        "hidden": 128,
    }
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "mine.yaml").write_text(
        "defaults:\n  - base_model\n  - _self_\n_target_: my.Net\nnum_classes: 10\nhidden: 64\n"
    )
    cfg = compose_config([f"hydra.searchpath=[file://{tmp_path}]", "model=mine"])
    check_config(cfg)
    assert cfg.model.hidden == 64
    assert cfg.model.num_classes == 10
    mine = [f"hydra.searchpath=[file://{tmp_path}]", "model=mine"]
    assert compose_config([*mine, "model.hidden=x"]).model.hidden == "x"  # untyped: its own
    assert _refusal([*mine, "model.num_classes=x"]).startswith("model.num_classes='x' must be")
    message = _refusal([*mine, "model.hiden=32"])  # a new key needs `+`, as everywhere
    assert message.startswith("model.hiden is not a config key (did you mean model.hidden?)")
    assert "+model.hiden=" in message


def test_a_group_option_that_does_not_exist_is_refused_in_one_line() -> None:
    message = _refusal(["model=resnet"])
    assert message == "model=resnet is not an option of model: name one of convnet, wide_convnet"


def test_a_schema_is_not_an_option_to_pick() -> None:
    """`data=base_data` holds types, not values: refused as any unknown option is."""
    with pytest.raises(UserError, match=r"^data=base_data is not an option of data: name one of"):
        check_overrides(["data=base_data"])


@pytest.mark.parametrize(
    "override",
    [
        "trainer.precision=32",
        "trainer.precision=bf16-mixed",
        "device.type=cuda:1",
        "trainer.epochs=0",
        "trainer.label_smoothing=0.1",
        "trainer.compile=true",
        "trainer.progress_bar=null",
        "optimizer.fused=null",
        "optimizer.lr=1",
        "model=wide_convnet",
        "+mlflow.tags.team=vision",
        "mlflow.request_timeout_s=5",
        "mlflow.run_name=123",
        "trainer.monitor=val_loss",
        "trainer.early_stopping.min_delta=0.01",
    ],
)
def test_good_values_pass(override: str) -> None:
    _check([override])


@pytest.mark.parametrize(
    ("override", "start"),
    [
        ("trainer.epoch=3", "error: trainer.epoch is not a config key (did you mean"),
        ("trainer.epochs=abc", "error: trainer.epochs='abc' must be a whole number: change it"),
        ("data.batch_size=1.5", "error: data.batch_size=1.5 must be a whole number: change it"),
        ("model=resnet", "error: model=resnet is not an option of model"),
    ],
)
def test_the_command_refuses_a_composition_error_in_one_line(
    override: str, start: str, capfd
) -> None:
    """Hydra would print the error over several lines, or a stack trace."""
    for args in ([override], [override, "--cfg", "job"]):
        ended = in_process(train.run_command, args, capfd)
        assert ended.code == 1, ended.err
        assert ended.err.startswith(start) and ended.err.count("\n") == 1, ended.err
        assert ended.out == ""


def test_every_option_file_extends_a_schema_or_an_option_that_does() -> None:
    for group in ("model", "optimizer", "scheduler", "data", "device", "trainer", "mlflow"):
        options = {f.stem for f in (CONF_DIR / group).glob("*.yaml")}
        for option in options:
            defaults = OmegaConf.load(CONF_DIR / group / f"{option}.yaml").get("defaults")
            assert defaults is not None and defaults[-1] == "_self_", f"{group}/{option}"
            first = str(defaults[0])
            assert first.startswith("base_") or first in options - {option}, f"{group}/{option}"
