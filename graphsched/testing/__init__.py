"""Helpers for running graphsched code in several processes (tests, demo, benchmarks)."""

from graphsched.testing.launch import find_free_port, run_distributed

__all__ = ["find_free_port", "run_distributed"]
