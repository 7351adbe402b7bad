"""terarec.serve."""
