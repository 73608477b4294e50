"""Checks a training config can run on `world_size` processes, before any process group starts.

The loader (moevit.config.loader) already refused unknown keys and wrong types. What is left needs the
tasks, the built model or the world size: every task has a dataset whose root exists (with shards: whose
split directories hold shards of the config's format), the model builds
(top-k within the expert count, image sizes that fit the patch grid), and `parallel.ep_size` divides
both the world size and every MoE layer's expert count (moevit.parallel.layout.check_layout).
`start_from_init` loads `model.init` into the built model (moevit.artifacts.init).
"""

from __future__ import annotations

from pathlib import Path

import torch

from moevit.artifacts.init import InitReport, apply_init
from moevit.config.errors import ConfigError
from moevit.config.schema import Config
from moevit.data.errors import DatasetLayoutError
from moevit.data.seeding import derive_seed
from moevit.data.shards.indexed import IndexedShards
from moevit.factory import build_model
from moevit.layers.moe_mlp import MoEMlp
from moevit.models.multitask import MultiTaskModel
from moevit.parallel.layout import check_layout
from moevit.train.wandb_sink import check_wandb_available


def build_checked_model(cfg: Config, world_size: int, source: str = "config") -> MultiTaskModel:
    """The single-device model of `cfg`, built with `cfg.seed`, once the config passed every check.

    Args:
        cfg: a loaded (type-checked) config.
        world_size: processes the job will run on.
        source: where the config came from, for error messages (its path).
    """
    missing = [name for name, task in cfg.tasks.items() if task.data is None]
    if missing:
        keys = ", ".join(f"'tasks.{name}.data'" for name in missing)
        raise ConfigError(source, f"training needs a dataset for every task; missing {keys}")
    # The readers check each layout in detail when the workers open them; a missing root is the common
    # typo, and cheap to catch here, before any worker starts.
    for name, task in cfg.tasks.items():
        if not Path(task.data.root).is_dir():
            raise ConfigError(source, f"'tasks.{name}.data.root': {task.data.root} is not a directory")
        if task.data.storage == "shards":
            # Only _info.json is read: a missing, empty or unfinished split, or shards of another dataset.
            for split in (task.data.train_split, task.data.val_split):
                try:
                    IndexedShards(Path(task.data.root) / split, task.data.format)
                except DatasetLayoutError as err:
                    raise ConfigError(source, f"'tasks.{name}.data' (storage: shards): {err}") from None
    check_wandb_available(cfg, source)  # before a job is submitted or workers spawn, not at step 1
    torch.manual_seed(cfg.seed)  # every rank builds identical weights; EP then keeps each rank's shard
    try:
        model = build_model(cfg)
    except (ValueError, TypeError) as err:  # TypeError: an unknown head option
        raise ConfigError(source, f"the model of 'model' and 'tasks' cannot be built: {err}") from None
    # Expert parallelism shards the MLP experts (moevit.parallel.expert_parallel); attention experts stay whole.
    expert_counts = {module.num_experts for module in model.modules() if isinstance(module, MoEMlp)}
    for num_experts in sorted(expert_counts) or [None]:
        check_layout(cfg, world_size, num_experts)
    return model


def start_from_init(model: MultiTaskModel, cfg: Config) -> InitReport | None:
    """Loads `model.init` into the single-device `model` (None when the config names none).

    Every rank calls it alike before the engine wraps the model: the expert noise comes from a
    generator seeded by the run's seed, so the ranks' replicas agree. A bad path, an unreadable file
    or a tensor of the wrong shape is a ConfigError, before any training step."""
    if cfg.model.init is None:
        return None
    noise = cfg.model.init_expert_noise or 0.0
    return apply_init(model, cfg.model.init, noise, derive_seed(cfg.seed, "model.init_expert_noise"))
