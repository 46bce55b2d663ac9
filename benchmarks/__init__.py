"""Benchmark scripts: ``python -m benchmarks`` runs them all."""
