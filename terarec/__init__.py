"""terarec: CTR training with embedding tables larger than GPU memory."""

__version__ = "0.1.0"
