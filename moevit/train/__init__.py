"""Training: the loop and what it needs (optimizer groups, loss balancing, logging)."""
