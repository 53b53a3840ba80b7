"""Per-experiment ml_collections configs."""
