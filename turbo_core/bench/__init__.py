"""Benchmarks: each prints a table and writes JSON (with device and versions)."""
