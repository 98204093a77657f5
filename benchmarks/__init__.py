"""Benchmarks of the engine and the Serve graph: `python -m benchmarks`."""

from benchmarks.core import BenchSettings, engine_benchmarks

__all__ = ["BenchSettings", "engine_benchmarks"]
