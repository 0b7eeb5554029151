"""polymorphd models: PyTorch pieces plus torch-free shared cores."""
