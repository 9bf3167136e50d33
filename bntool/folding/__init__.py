"""folding."""
