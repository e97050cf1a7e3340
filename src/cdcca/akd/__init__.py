"""Adaptive knowledge distillation: the teacher pass, prefix distillation, the student update, the source set."""
