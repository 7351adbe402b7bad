"""terarec.ps."""
