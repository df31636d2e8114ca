"""edgeprune: prune and quantize Llama-family models until they meet an edge device's budget."""

__version__ = "0.1.0"
