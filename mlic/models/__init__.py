"""Models: backbones (images to feature maps), heads (feature maps to logits) and the classifier composing them.

Importing the package imports the modules that register backbones and heads in :mod:`mlic.registry`.
"""

from mlic.models import backbones, cvt, heads, ml_decoder  # noqa: F401  (each registers its members)
