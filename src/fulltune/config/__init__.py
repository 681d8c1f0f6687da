"""Typed run configuration: the sections (`sections`), loading with aliases and overrides (`load`), and the checks
(`checks`). Everything a caller needs is importable from `fulltune.config`.
"""

from fulltune.config.checks import METRICS, check_ranges, validate
from fulltune.config.load import (
    ALIASES,
    _coerce,
    _flatten,
    config_from_dict,
    load_config,
    parse_override,
    save_config,
    to_dict,
)
from fulltune.config.sections import (
    DEFAULT_PROMPT_TEMPLATES,
    AugmentationConfig,
    CheckpointConfig,
    Config,
    DataConfig,
    EarlyStoppingConfig,
    HardwareConfig,
    LayerwiseLRConfig,
    LoggingConfig,
    LoraConfig,
    MethodConfig,
    ModelConfig,
    ProgressiveUnfreezingConfig,
    TrainingConfig,
    UnfreezeStep,
)
from fulltune.errors import ConfigError

__all__ = [
    "ALIASES",
    "DEFAULT_PROMPT_TEMPLATES",
    "METRICS",
    "AugmentationConfig",
    "CheckpointConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "EarlyStoppingConfig",
    "HardwareConfig",
    "LayerwiseLRConfig",
    "LoggingConfig",
    "LoraConfig",
    "MethodConfig",
    "ModelConfig",
    "ProgressiveUnfreezingConfig",
    "TrainingConfig",
    "UnfreezeStep",
    "_coerce",
    "_flatten",
    "check_ranges",
    "config_from_dict",
    "load_config",
    "parse_override",
    "save_config",
    "to_dict",
    "validate",
]
