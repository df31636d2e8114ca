"""Write models to files runtimes load: GGUF (llama/deci architecture), and transformers checkpoints."""

from edgeprune.export.gguf_llama import DTYPES, Provenance, export_gguf, write_gguf
from edgeprune.export.hf_checkpoint import write_hf_checkpoint

__all__ = ["DTYPES", "Provenance", "export_gguf", "write_gguf", "write_hf_checkpoint"]
