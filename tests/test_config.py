"""Every option of every config group composes, validates and instantiates."""

import shutil
from dataclasses import fields
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import get_class, instantiate
from omegaconf import OmegaConf

from mnist_exp.config import schema
from mnist_exp.config.checks import check_config
from mnist_exp.config.paths import CONF_DIR, PROJECT_ROOT, compose_config
from mnist_exp.errors import UserError
from mnist_exp.runner.build import model_arguments
from mnist_exp.tracking.redaction import redact
from mnist_exp.training.compute import resolve_device

OPTIONS = sorted(
    (group.name, option.stem)
    for group in CONF_DIR.iterdir()
    if group.is_dir() and group.name != "hydra"  # Hydra's own groups: tested below
    for option in group.glob("*.yaml")
)


def test_every_group_of_the_design_has_its_options() -> None:
    assert {
        ("model", "convnet"),
        ("optimizer", "adam"),
        ("optimizer", "sgd"),
        ("optimizer", "adamw"),
        ("data", "mnist"),
        ("data", "fashion_mnist"),
        ("device", "auto"),
        ("device", "cpu"),
        ("device", "cuda"),
        ("experiment", "seed"),
        ("mlflow", "local"),
        ("mlflow", "server"),
        ("experiment", "fast"),
        ("scheduler", "onecycle"),
        ("hparams_search", "optuna"),
    } <= set(OPTIONS)


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_option_composes_and_instantiates(group: str, option: str) -> None:
    folder = ["data.root=images"] if option == "image_folder" else []  # no default folder
    cfg = compose_config([f"{group}={option}", *folder])
    check_config(cfg)
    # As a run builds it: image_folder's in_channels is null, the loaded images' channels.
    model = instantiate(model_arguments(cfg, channels=1))
    optimizer = instantiate(cfg.optimizer)(model.parameters())
    assert isinstance(optimizer, torch.optim.Optimizer)
    assert optimizer.param_groups[0]["lr"] == cfg.optimizer.lr
    if cfg.get("scheduler"):
        scheduler = instantiate(cfg.scheduler)(optimizer, total_steps=10)
        assert isinstance(scheduler, torch.optim.lr_scheduler.LRScheduler)
    assert get_class(cfg.data.dataset).__name__ in {"MNIST", "FashionMNIST", "ImageFolder"}
    if cfg.device.type == "cuda" and not torch.cuda.is_available():
        with pytest.raises(UserError, match="device=cuda"):
            resolve_device(cfg.device.type)
    else:
        assert resolve_device(cfg.device.type).type in {"cpu", "cuda"}


def test_defaults_are_the_seed_model_optimizer_and_epochs_at_batch_64() -> None:
    cfg = compose_config()
    assert cfg.model._target_ == "mnist_exp.models.ConvNet"
    assert cfg.optimizer._target_ == "torch.optim.Adam"
    assert cfg.optimizer.lr == 0.001
    assert cfg.trainer.epochs == 5
    assert cfg.data.batch_size == 64
    assert cfg.trainer.log_every_n_steps == 1
    assert str(cfg.trainer.precision) == "32"


def test_experiment_seed_is_the_seed_scripts_hyperparameters() -> None:
    cfg = compose_config(["experiment=seed", "data.batch_size=32", "trainer.epochs=1"])
    # An experiment file is applied last, so it wins over the groups and the primary config.
    assert cfg.optimizer._target_ == "torch.optim.Adam"
    assert cfg.optimizer.lr == 0.001
    seed = compose_config(["experiment=seed"])
    assert seed.trainer.epochs == 5
    assert seed.data.batch_size == 1
    assert seed.data.val_size == 0
    assert seed.data.max_train_samples is None
    assert cfg.data.batch_size == 32  # command-line overrides still win over the experiment


def test_experiment_fast_keeps_the_model_and_changes_only_the_recipe() -> None:
    default, fast = compose_config(), compose_config(["experiment=fast"])
    assert fast.model == default.model
    assert fast.trainer.epochs == 1
    assert fast.trainer.precision == "bf16-mixed"
    assert fast.scheduler._target_ == "torch.optim.lr_scheduler.OneCycleLR"
    assert fast.scheduler.max_lr == fast.optimizer.lr
    assert fast.optimizer.fused is True
    assert fast.trainer.label_smoothing == 0.1 and default.trainer.label_smoothing == 0


def test_tracking_uri_defaults_to_sqlite_in_the_project_and_env_wins(monkeypatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    root = PROJECT_ROOT
    assert compose_config().mlflow.tracking_uri == f"sqlite:///{root}/mlruns/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert compose_config().mlflow.tracking_uri == "http://127.0.0.1:5000"


def test_mlflow_server_points_at_a_server_and_holds_no_credentials(monkeypatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = compose_config(["mlflow=server"])
    assert cfg.mlflow.tracking_uri == "http://127.0.0.1:5000"
    assert cfg.mlflow.retry_for_s > 0
    assert not {"username", "password", "token"} & set(cfg.mlflow)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://mlflow.lab.example.org")
    assert compose_config(["mlflow=server"]).mlflow.tracking_uri == "https://mlflow.lab.example.org"


def test_credentials_in_a_uri_are_redacted() -> None:
    assert redact("http://alice:s3cret@host:5000/x") == "http://***@host:5000/x"
    assert (
        redact("mlflow.tracking_uri=https://tok@h a=b") == "mlflow.tracking_uri=https://***@h a=b"
    )
    assert redact("sqlite:////tmp/mlruns/mlflow.db") == "sqlite:////tmp/mlruns/mlflow.db"


def _launcher(option: str) -> dict:
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", [f"hydra/launcher={option}"], return_hydra_config=True)
    return OmegaConf.to_container(cfg.hydra.launcher, resolve=True)


def test_launcher_slurm_extends_the_submitit_plugin(monkeypatch) -> None:
    monkeypatch.delenv("SLURM_PARTITION", raising=False)
    launcher = _launcher("slurm")
    assert launcher["_target_"].endswith("submitit_launcher.SlurmLauncher")
    assert (launcher["cpus_per_task"], launcher["mem_gb"], launcher["partition"]) == (4, 4, None)
    assert launcher["max_num_timeout"] == 3  # requeued at most 3 times; the plugin's keys stay
    monkeypatch.setenv("SLURM_PARTITION", "gpu")
    assert _launcher("slurm")["partition"] == "gpu"
    assert _launcher("submitit_local")["_target_"].endswith("submitit_launcher.LocalLauncher")


def test_launcher_ray_cluster_extends_the_ray_plugin(monkeypatch) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    launcher = _launcher("ray_cluster")
    assert launcher["_target_"].endswith("ray_launcher.RayLauncher")
    assert launcher["ray"]["init"]["address"] is None
    # Present, so the plugin does not set its own, which a running cluster refuses.
    assert launcher["ray"]["init"]["object_store_memory"] is None
    assert launcher["ray"]["remote"] == {"num_cpus": 2, "num_gpus": 0, "max_retries": 0}
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    assert _launcher("ray_cluster")["ray"]["init"]["address"] == "ray://head:10001"


def _compose_in(conf_dir: Path, overrides: list[str]) -> dict:
    with initialize_config_dir(str(conf_dir), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    return OmegaConf.to_container(cfg)


@pytest.mark.parametrize(
    ("group", "option", "base", "key", "value"),
    [
        ("data", "fashion_mnist", "mnist", "batch_size", 48),
        ("data", "fashion_mnist", "mnist", "max_shift", 3),
        ("mlflow", "server", "local", "experiment_name", "elsewhere"),
        ("mlflow", "server", "local", "log_model", False),
        ("optimizer", "adamw", "adam", "betas", [0.8, 0.9]),
    ],
)
def test_an_option_inherits_what_its_base_option_sets(
    tmp_path: Path, group: str, option: str, base: str, key: str, value: object
) -> None:
    """Change a default of the base option in a copy of conf/: the option extending it follows."""
    conf = tmp_path / "conf"
    shutil.copytree(CONF_DIR, conf)
    assert _compose_in(conf, [f"{group}={option}"])[group][key] != value
    base_file = conf / group / f"{base}.yaml"
    text = OmegaConf.load(base_file)
    text[key] = value
    OmegaConf.save(text, base_file)
    assert _compose_in(conf, [f"{group}={option}"])[group][key] == value


def test_fashion_mnist_is_mnist_with_another_dataset() -> None:
    mnist, fashion = compose_config(), compose_config(["data=fashion_mnist"])
    assert fashion.data.dataset == "torchvision.datasets.FashionMNIST"
    assert {k: v for k, v in fashion.data.items() if k != "dataset"} == {
        k: v for k, v in mnist.data.items() if k != "dataset"
    }


def test_mlflow_server_is_local_with_a_server_and_a_longer_wait(monkeypatch) -> None:
    for variable in ("TRACKING_URI", "HTTP_REQUEST_MAX_RETRIES", "HTTP_REQUEST_TIMEOUT"):
        monkeypatch.delenv(f"MLFLOW_{variable}", raising=False)
    local, server = compose_config().mlflow, compose_config(["mlflow=server"]).mlflow
    assert set(server) == set(local)
    assert (server.tracking_uri, server.retry_for_s) == ("http://127.0.0.1:5000", 300)
    # A server URI given to mlflow=local is not waited for minutes by MLflow's own retries.
    assert (local.request_max_retries, local.request_timeout_s) == (1, 30)
    same = set(local) - {"tracking_uri", "retry_for_s", "tags"}
    assert {k: server[k] for k in same} == {k: local[k] for k in same}


def test_each_group_is_typed_by_its_schema() -> None:
    """Closed groups are their schema's objects; `_target_` groups type the keys they have."""
    for option in ("convnet", "wide_convnet"):
        cfg = compose_config([f"model={option}", "optimizer=sgd", "scheduler=onecycle"])
        for group, group_schema in schema.CLOSED_GROUPS.items():
            assert issubclass(group_schema, OmegaConf.get_type(cfg[group])), group
        assert OmegaConf.get_type(cfg) is schema.ConfigSchema
        for group in schema.TARGET_GROUPS:
            assert OmegaConf.get_type(cfg[group]) is dict  # open to a `_target_`'s arguments
        # Each typed key refuses a value of another type.
        for group, name in [
            ("model", "num_classes"),
            ("optimizer", "lr"),
            ("scheduler", "div_factor"),
        ]:
            with pytest.raises(UserError, match=f"^{group}.{name}="):
                compose_config(
                    [f"model={option}", "optimizer=sgd", "scheduler=onecycle", f"{group}.{name}=x"]
                )


def test_the_schemas_hold_types_only_and_every_field_is_a_key_of_an_option() -> None:
    """Defaults live once, in the YAML files; a field no option sets would be a dead key."""
    set_by_options: dict[str, set[str]] = {}
    for group in {g for g, _ in schema.SCHEMAS if g}:
        for path in (CONF_DIR / group).glob("*.yaml"):
            node = compose_config([f"{group}={path.stem}"])[group]
            set_by_options.setdefault(group, set()).update(str(k) for k in node)
    for (group, _), group_schema in schema.SCHEMAS.items():
        for field in fields(group_schema):
            assert OmegaConf.is_missing(OmegaConf.structured(group_schema), field.name)
            if group:
                assert field.name in set_by_options[group], f"{group}.{field.name}"
