"""terarec.optim."""
