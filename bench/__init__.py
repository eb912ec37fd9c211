"""Benchmarks for the preprocessor and model services (`vlm bench`; see bench/README.md)."""
