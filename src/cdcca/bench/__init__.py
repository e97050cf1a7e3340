"""Benchmark logic behind ``cdcca bench ...``: the UTS, AKD and DWC studies, each printing JSON rows.
They drive the same stage code as the runtimes (importable from an installed package)."""
