"""Benchmarks (scripts that print the README tables) and their benchmark-only helpers:
``benchmarks.tasks`` (synthetic CPU tasks) and ``benchmarks.sft`` (the SFT warm start)."""
