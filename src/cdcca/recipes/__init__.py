"""Offline training recipes (pretraining, teacher consistency, prefix targets, read-out) and their checkpoints."""
