"""onnxio."""
