"""Structured pruning methods: importance scores -> what to remove (layers, sublayers, heads, channels)."""

from edgeprune.structured.analysis import structured_importance
from edgeprune.structured.methods import STRUCTURED_METHODS, StructuredSettings

__all__ = ["STRUCTURED_METHODS", "StructuredSettings", "structured_importance"]
