"""mlic: multi-label image classification from full, partial and single-positive labels."""

__version__ = "0.1.0"
