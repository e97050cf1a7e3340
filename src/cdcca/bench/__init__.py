"""Benchmark logic behind ``cdcca bench ...`` (importable from an installed package)."""
