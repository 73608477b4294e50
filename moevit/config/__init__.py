"""Configuration: the dataclass schema, strict YAML loading, dotted overrides."""

from moevit.config.errors import ConfigError
from moevit.config.loader import apply_overrides, build_config, config_to_dict, load_config, save_config
from moevit.config.schema import AuxLossConfig, Config, DatasetConfig, ModelConfig, MoEConfig, TaskConfig

__all__ = [
    "AuxLossConfig",
    "Config",
    "ConfigError",
    "DatasetConfig",
    "ModelConfig",
    "MoEConfig",
    "TaskConfig",
    "apply_overrides",
    "build_config",
    "config_to_dict",
    "load_config",
    "save_config",
]
