"""Values that cannot work are refused with one line naming the key."""

import pytest

from mnist_exp.config.paths import compose_config
from mnist_exp.errors import UserError
from mnist_exp.config.checks import check_config

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
    ("trainer.seed=-3", "trainer.seed"),
    ("trainer.log_every_n_steps=0", "trainer.log_every_n_steps"),
    ("trainer.precision=16", "trainer.precision"),
    ("trainer.label_smoothing=1", "trainer.label_smoothing"),
    ("model=wide_convnet model.channels=[32]", "model.channels"),
    ("model=wide_convnet model.channels=[0,64]", "model.channels"),
    ("model=wide_convnet model.dropout=1.5", "model.dropout"),
    ("data.max_rotation=-5", "data.max_rotation"),
    ("data.max_rotation=200", "data.max_rotation"),
    ("data.max_scale=1", "data.max_scale"),
    ("trainer.label_smoothing=-0.1", "trainer.label_smoothing"),
    ("device.type=tpu", "device.type"),
    ("model.num_classes=1", "model.num_classes"),
    ("trainer.compile=maybe", "trainer.compile"),
    ("trainer.cuda_graph=2", "trainer.cuda_graph"),
    ("trainer.channels_last=1", "trainer.channels_last"),
    ("optimized_metric=accuracy", "optimized_metric"),
]


@pytest.mark.parametrize(("override", "key"), BAD, ids=[b[0] for b in BAD])
def test_bad_value_is_refused_naming_the_key(override: str, key: str) -> None:
    with pytest.raises(UserError) as info:
        check_config(compose_config(override.split()))
    message = str(info.value)
    assert message.startswith(f"{key}=")
    assert "\n" not in message


@pytest.mark.parametrize(
    "override",
    [
        "trainer.precision=32",
        "trainer.precision=bf16-mixed",
        "device.type=cuda:1",
        "trainer.epochs=0",
        "trainer.label_smoothing=0.1",
        "model=wide_convnet",
    ],
)
def test_good_values_pass(override: str) -> None:
    check_config(compose_config([override]))
