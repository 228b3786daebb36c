"""Exporting checkpoints to other formats (ONNX); import the submodules, which need PyTorch."""
