"""One folder per method built on the core layers (see DESIGN.md)."""
