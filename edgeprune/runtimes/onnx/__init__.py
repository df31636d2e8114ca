"""ONNX Runtime as a runtime: Llama decoders written as ONNX graphs (llama.py over graph.py, with
block-quantized weights from nbits.py) and run by onnxruntime (session.py)."""
