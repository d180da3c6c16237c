"""Throughput and wall-clock benchmarks: each prints a table last and writes JSON (+ environment)."""
