"""Restoration systems, one folder each: how a method assembles the core packages (models,
diffusion, convert, train, export) into conditioning, restorers, training stages and an export
spec. A system imports the core and `systems/sd`, never another system."""
