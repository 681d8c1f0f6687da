"""Typed run configuration: the sections (`sections`), foreign names and the keys they become (`names`), values
checked against the sections' types (`coercion`), loading with overrides (`load`), and the checks (`checks`).
Everything a caller needs is importable from `fulltune.config`.
"""

from fulltune.config.checks import METRICS, check_ranges, validate
from fulltune.config.coercion import coerce
from fulltune.config.load import (
    config_from_dict,
    dotted_items,
    load_config,
    parse_override,
    save_config,
    to_dict,
)
from fulltune.config.names import ALIASES
from fulltune.config.sections import (
    DEFAULT_PROMPT_TEMPLATES,
    AugmentationConfig,
    CheckpointConfig,
    Config,
    DataConfig,
    EarlyStoppingConfig,
    EvalConfig,
    HardwareConfig,
    LayerwiseLRConfig,
    LoggingConfig,
    LoraConfig,
    MethodConfig,
    ModelConfig,
    ProgressiveUnfreezingConfig,
    SpeedConfig,
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
    "EvalConfig",
    "HardwareConfig",
    "LayerwiseLRConfig",
    "LoggingConfig",
    "LoraConfig",
    "MethodConfig",
    "ModelConfig",
    "ProgressiveUnfreezingConfig",
    "SpeedConfig",
    "TrainingConfig",
    "UnfreezeStep",
    "check_ranges",
    "coerce",
    "config_from_dict",
    "dotted_items",
    "load_config",
    "parse_override",
    "save_config",
    "to_dict",
    "validate",
]
