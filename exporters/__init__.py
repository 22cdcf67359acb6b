"""Exporters: one module per output format (onnx, tensorrt); `spec` describes the decoder graph."""
