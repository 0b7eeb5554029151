"""polymorphd export: torch -> ONNX bundle, plus torch-free verification."""
