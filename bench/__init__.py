"""Benchmarks: figures with references measured in the same run (see bench/run)."""
