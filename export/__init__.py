"""Graphs: torch -> ONNX tracing (trace), torch-free ONNX composition (compose), TensorRT engines."""
