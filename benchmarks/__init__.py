"""Benchmarks and exactness guards for the quantizer (not installed; run from the repository root)."""
