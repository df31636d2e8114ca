"""Run a model file: llama.cpp through llama-cpp-python (timings, logits)."""
