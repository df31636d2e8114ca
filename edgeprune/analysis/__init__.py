"""Importance of layers and heads, measured on calibration activations."""

from edgeprune.analysis.importance import Importance, compute_importance

__all__ = ["Importance", "compute_importance"]
