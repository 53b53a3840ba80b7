"""Training loops, one per stage."""
