"""Benchmark harness of `make bench` (see bench/README.md); not part of the installed package."""
