"""terarec.launch."""
