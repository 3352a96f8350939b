"""Benchmarks of diffpure_jax (see benchmarks/README.md)."""
