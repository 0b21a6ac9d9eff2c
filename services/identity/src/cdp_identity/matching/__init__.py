"""Probabilistic record matching (Fellegi-Sunter with EM-estimated weights, blocking, string similarity).

Pure domain code: records in, scored pairs and clusters out; no I/O. See `matcher.py` for the workflow.
"""

from .config import DEFAULT_PERSON_CONFIG, ComparisonSpec, EmSettings, MatchConfig
from .matcher import ComparisonEstimate, FitReport, LevelEstimate, Matcher, ScoredPair

__all__ = [
    "DEFAULT_PERSON_CONFIG",
    "ComparisonEstimate",
    "ComparisonSpec",
    "EmSettings",
    "FitReport",
    "LevelEstimate",
    "MatchConfig",
    "Matcher",
    "ScoredPair",
]
