"""Fuzzing the config: any override value is run or refused with a clear line, never a crash.

Most examples go through what `mnist-train` does before it trains (Hydra's composition
against the schema, `check_config`, building the model, optimizer and schedule), in this
process for speed; a few go through the whole command (in this process too) on a tiny data
set. A refusal is one line that names the key (or the override) and says what to do.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from conftest import runs_in
from hydra.utils import instantiate
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mnist_exp.config.checks import check_config, check_overrides
from mnist_exp.config.paths import compose_config
from mnist_exp.errors import UserError
from mnist_exp.training import compute

# Keys a quick run can take any value of (a huge trainer.epochs would be valid, and slow).
QUICK_KEYS = [
    "optimizer.lr",
    "optimizer.momentum",
    "optimizer.weight_decay",
    "data.batch_size",
    "data.eval_batch_size",
    "data.max_shift",
    "trainer.seed",
    "trainer.log_every_n_steps",
    "trainer.print_every_n_steps",
    "trainer.precision",
    "trainer.channels_last",
    "trainer.deterministic",
    "trainer.num_threads",
    "model.num_classes",
    "device",
    "device.type",
    "optimizer",
    "scheduler",
    "scheduler.pct_start",
    "optimized_metric",
    "data.dataset",
    "data.download",
    "mlflow.run_name",
]
KEYS = QUICK_KEYS + [
    "data.val_size",
    "data.max_train_samples",
    "data.max_test_samples",
    "trainer.epochs",
    "trainer.compile",
    "trainer.cuda_graph",
    "trainer.resume",
    "data.root",
    "mlflow.experiment_name",
    "mlflow.tracking_uri",
    "experiment",
    "trainer.monitor",
    "trainer.test_best",
    "trainer.early_stopping.patience",
    "trainer.early_stopping.min_delta",
]
SPECIAL = [
    "null", "true", "false", "[]", "[1,2]", "{}", "{a: 1}", "''", "???", "nan", "inf", "-inf",
    "1e400", "-0.0", "0", "-1", "2147483648", "18446744073709551616", "${oc.env:NO_SUCH_VAR}",
    "${nope}", "${optimizer.lr}", "cuda:x", "cuda:0", "bf16-mixed", "32", "16", "sgd",
    "adamw", "onecycle", "fast", "seed", "val_accuracy", "'a b'", "'x=y'", "\\'", "%", "~",
]  # fmt: skip
VALUES = st.one_of(
    st.sampled_from(SPECIAL),
    st.integers(min_value=-(2**70), max_value=2**70).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.text(st.characters(codec="ascii", exclude_categories=("Cc",)), max_size=10),
)


def _overrides(keys: list[str]) -> st.SearchStrategy[list[str]]:
    pair = st.tuples(st.sampled_from(keys), VALUES).map(lambda kv: f"{kv[0]}={kv[1]}")
    return st.lists(pair, min_size=1, max_size=3)


def _assert_one_clear_line(exc: UserError, overrides: list[str]) -> None:
    message = str(exc)
    assert "\n" not in message and len(message) < 400, message
    keys = [o.split("=")[0].lstrip("+~") for o in overrides]
    assert any(key in message for key in keys), (message, overrides)


@pytest.mark.slow  # 60 composed configs
@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(_overrides(KEYS))
def test_any_override_is_accepted_or_refused_in_one_line(overrides: list[str]) -> None:
    try:
        check_overrides(overrides)
        cfg = compose_config(overrides)  # Hydra's composition errors come as UserError too
        check_config(cfg)
        device = compute.resolve_device(cfg.device.type)
    except UserError as exc:
        _assert_one_clear_line(exc, overrides)
        return
    # Accepted: what the command builds next must then work.
    compute.seed_everything(cfg.trainer.seed, deterministic=False)
    model = instantiate(cfg.model)
    model(torch.zeros(2, 1, 28, 28))
    optimizer = instantiate(cfg.optimizer)(model.parameters())
    if cfg.get("scheduler"):
        instantiate(cfg.scheduler)(optimizer, total_steps=10)
    assert device.type in ("cpu", "cuda")


_RUNS = itertools.count()  # a run folder for each example


@pytest.mark.slow  # trains
@settings(
    max_examples=10,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(_overrides(QUICK_KEYS))
def test_the_command_runs_or_says_why_in_one_line(
    mnist_train, tracking_uri: str, tmp_path: Path, overrides: list[str]
) -> None:
    """`mnist-train` on 64 images for one epoch, the fuzzed overrides last; one store for all.
    In this process: a crash is the exception itself, rather than a traceback on stderr."""
    deterministic, threads = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    try:
        ended = mnist_train(
            f"hydra.run.dir={tmp_path}/run{next(_RUNS)}", "mlflow.log_plots=true",
            "mlflow.log_model=true", "data.max_train_samples=64", "data.max_test_samples=64",
            "trainer.epochs=1", *overrides,
        )  # fmt: skip
    finally:  # trainer.deterministic and num_threads hold for the process, not the next tests
        torch.use_deterministic_algorithms(deterministic)
        torch.set_num_threads(threads)
    assert [r.info.run_id for r in runs_in(tracking_uri) if r.info.status == "RUNNING"] == []
    if ended.code == 0:
        return
    assert ended.code in (1, 2), ended.err
    assert "Traceback" not in ended.err, ended.err
    lines = ended.err.strip().splitlines()
    assert lines, ended.out
    # One line, Hydra's composition errors included (no "set HYDRA_FULL_ERROR" epilogue).
    assert len(lines) == 1 and lines[0].startswith("error: "), ended.err
