"""The schema of each config group: dataclasses that Hydra's ConfigStore holds as `base_*` options.

Option files extend theirs (`defaults: [base_trainer, _self_]`): a wrong type or unknown key is
refused as Hydra composes. `_target_` groups stay open to a user's own `_target_`'s arguments
(`+model.hidden=128`), so that its recorded run still reruns; defaults live in the YAML files.
"""

from __future__ import annotations

from dataclasses import dataclass, is_dataclass
from typing import Any, get_type_hints

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

# Fields in the YAML files' order: merged first, the schema orders `--cfg job` and the params.


@dataclass
class ConfigSchema:  # conf/config.yaml: the top level, beside the groups
    optimized_metric: str = MISSING


@dataclass
class ModelSchema:  # conf/model/convnet.yaml; a user's own model may extend it too
    _target_: str = MISSING
    num_classes: int = MISSING


@dataclass
class ConvNetSchema(ModelSchema):  # conf/model/convnet.yaml
    image_size: int = MISSING
    in_channels: int | None = MISSING


@dataclass
class WideConvNetSchema(ModelSchema):  # conf/model/wide_convnet.yaml
    channels: list[int] = MISSING
    dropout: float = MISSING
    image_size: int = MISSING
    in_channels: int | None = MISSING


@dataclass
class OptimizerSchema:  # every optimizer option: a torch.optim class, built once the model is
    _target_: str = MISSING
    _partial_: bool = MISSING
    lr: float = MISSING


@dataclass
class AdamSchema(OptimizerSchema):  # conf/optimizer/adam.yaml and adamw.yaml
    betas: list[float] = MISSING
    weight_decay: float = MISSING
    fused: bool | None = MISSING


@dataclass
class SgdSchema(OptimizerSchema):  # conf/optimizer/sgd.yaml
    momentum: float = MISSING
    nesterov: bool = MISSING
    weight_decay: float = MISSING
    fused: bool | None = MISSING


@dataclass
class OneCycleSchema:  # conf/scheduler/onecycle.yaml
    _target_: str = MISSING
    _partial_: bool = MISSING
    max_lr: float = MISSING
    pct_start: float = MISSING
    anneal_strategy: str = MISSING
    div_factor: float = MISSING
    final_div_factor: float = MISSING


@dataclass
class DataSchema:  # conf/data/mnist.yaml, and fashion_mnist.yaml through it
    dataset: str = MISSING
    root: str = MISSING
    download: bool = MISSING
    batch_size: int = MISSING
    eval_batch_size: int = MISSING
    val_size: int = MISSING
    max_shift: int = MISSING
    max_rotation: float = MISSING
    max_scale: float = MISSING
    max_train_samples: int | None = MISSING
    max_test_samples: int | None = MISSING


@dataclass
class ImageFolderSchema(DataSchema):  # conf/data/image_folder.yaml: a folder of one's own images
    test_fraction: float = MISSING
    image_size: int = MISSING
    channels: int | None = MISSING
    cache_dir: str | None = MISSING


@dataclass
class DeviceSchema:  # conf/device/*.yaml
    type: str = MISSING


@dataclass
class EarlyStoppingSchema:  # conf/trainer/default.yaml's early_stopping
    patience: int | None = MISSING
    min_delta: float = MISSING


@dataclass
class TrainerSchema:  # conf/trainer/default.yaml
    epochs: int = MISSING
    seed: int = MISSING
    deterministic: bool = MISSING
    log_every_n_steps: int = MISSING
    print_every_n_steps: int = MISSING
    progress_bar: bool | None = MISSING
    label_smoothing: float = MISSING
    precision: str = MISSING
    channels_last: bool = MISSING
    compile: bool = MISSING
    cuda_graph: bool = MISSING
    num_threads: int | None = MISSING
    resume: str | None = MISSING
    monitor: str = MISSING
    test_best: bool = MISSING
    early_stopping: EarlyStoppingSchema = MISSING


@dataclass
class MlflowSchema:  # conf/mlflow/local.yaml
    tracking_uri: str = MISSING
    experiment_name: str = MISSING
    run_name: str | None = MISSING
    tags: dict[str, str] = MISSING
    log_plots: bool = MISSING
    log_model: bool = MISSING
    log_checkpoints: str = MISSING
    log_system_metrics: bool = MISSING
    continue_sweeps: bool = MISSING
    system_metrics_interval_s: float = MISSING
    retry_for_s: int = MISSING
    request_max_retries: int = MISSING
    request_timeout_s: int = MISSING


# (group, name) -> schema, as `defaults` in conf/ name them; group "" is the top level.
SCHEMAS: dict[tuple[str, str], type] = {
    ("", "base_config"): ConfigSchema,
    ("model", "base_model"): ModelSchema,
    ("model", "base_convnet"): ConvNetSchema,
    ("model", "base_wide_convnet"): WideConvNetSchema,
    ("optimizer", "base_adam"): AdamSchema,
    ("optimizer", "base_sgd"): SgdSchema,
    ("scheduler", "base_onecycle"): OneCycleSchema,
    ("data", "base_data"): DataSchema,
    ("data", "base_image_folder"): ImageFolderSchema,
    ("device", "base_device"): DeviceSchema,
    ("trainer", "base_trainer"): TrainerSchema,
    ("mlflow", "base_mlflow"): MlflowSchema,
}
# Groups whose node Hydra instantiates: their keys are the `_target_`'s arguments.
TARGET_GROUPS = ("model", "optimizer", "scheduler")
# Groups whose node is an object of our own: each option file fits the group's widest (last) schema.
CLOSED_GROUPS: dict[str, type] = {
    group: schema for (group, _), schema in SCHEMAS.items() if group and group not in TARGET_GROUPS
}


def register() -> None:
    """Store every schema in Hydra's ConfigStore (again: storing twice replaces)."""
    store = ConfigStore.instance()
    for (group, name), schema in SCHEMAS.items():
        store.store(name=name, group=group or None, node=_node(group, schema))


def schema_names() -> set[str]:
    """The names the schemas take among a group's options (not options to choose)."""
    return {name for _, name in SCHEMAS}


def bool_keys() -> dict[str, bool]:
    """Every `group.key` some schema types as a flag, and whether it may also be null."""
    found: dict[str, bool] = {}
    for (group, _), schema in SCHEMAS.items():
        for name, hint in get_type_hints(schema).items():
            if hint in (bool, bool | None):
                key = f"{group}.{name}" if group else name
                found[key] = found.get(key, False) or hint is not bool
    return found


def _node(group: str, schema: type) -> Any:
    """The node to store: the dataclass itself, or for a `_target_` group an open dictionary
    holding its typed fields (a dataclass node would refuse a `_target_`'s other arguments)."""
    assert is_dataclass(schema)
    if group not in TARGET_GROUPS:
        # The top level stays open to the groups' nodes, which their own schemas check.
        return OmegaConf.structured(schema, flags={"struct": False}) if not group else schema
    typed = OmegaConf.structured(schema)
    node = OmegaConf.create({key: typed._get_node(key) for key in typed})
    assert isinstance(node, DictConfig)
    return node
