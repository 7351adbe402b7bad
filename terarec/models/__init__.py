"""terarec.models."""
