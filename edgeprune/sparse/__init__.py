"""Unstructured and N:M sparsity: Wanda, SparseGPT, magnitude (masks and updates as pure tensor
functions; sequential calibration over a whole model in `sequential`)."""

from edgeprune.sparse.methods import SPARSE_METHODS, SparseMethod, SparseSettings
from edgeprune.sparse.sequential import SparsifyReport, sparsify

__all__ = ["SPARSE_METHODS", "SparseMethod", "SparseSettings", "SparsifyReport", "sparsify"]
