"""terarec.topology."""
