"""Benchmarks (``python -m bench``; see bench/suite.py). Not run in CI beyond a smoke of the entry point."""
