"""Benchmarks of compressing-scp against the alternatives: python -m benchmarks --help."""
