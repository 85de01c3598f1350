"""Numerics of foldstream: implicit ALS, exact batched fold-in, evaluation, model artifacts.

This package never imports Kafka, RocksDB or Prometheus.
"""

from factors.errors import ArtifactError, ConfigError, DataError, FactorsError, ModelFitError

__all__ = ["ArtifactError", "ConfigError", "DataError", "FactorsError", "ModelFitError"]
