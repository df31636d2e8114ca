"""Write models to files runtimes load: GGUF (llama architecture)."""

from edgeprune.export.gguf_llama import Provenance, export_gguf

__all__ = ["Provenance", "export_gguf"]
