"""Runtimes: what runs a model file (llama.cpp today). Imports nothing: stage keys hash parent
packages, so this file stays free of any one runtime."""
