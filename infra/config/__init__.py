"""One typed configuration schema for the whole pipeline (see ``schema.PipelineConfig``)."""

from infra.config.schema import (
    ConfigError,
    PipelineConfig,
    config_hash,
    deep_merge,
    load_config,
    parse_yaml,
    to_yaml,
    validate,
)

__all__ = ["ConfigError", "PipelineConfig", "config_hash", "deep_merge", "load_config", "parse_yaml", "to_yaml",
           "validate"]
