"""Importance: which layers, sublayers, heads and FFN channels matter (scores, registries, runners)."""

from edgeprune.analysis.importance import Importance

__all__ = ["Importance"]
