"""Model sources and the torch reference model every candidate is derived from and compared to."""

from edgeprune.models.reference import Reference, load_reference
from edgeprune.models.source import ModelSource, resolve_source

__all__ = ["ModelSource", "Reference", "load_reference", "resolve_source"]
