"""Scoring rules as plain Python: model specs, feature assembly, the registry of versions and roles."""

from cdp_scoring.domain.features import FeatureAssembler, epoch_seconds
from cdp_scoring.domain.spec import METADATA_KEY, FeatureSpec, ModelSpec, OutputSpec

__all__ = ["METADATA_KEY", "FeatureAssembler", "FeatureSpec", "ModelSpec", "OutputSpec", "epoch_seconds"]
