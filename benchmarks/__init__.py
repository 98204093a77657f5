"""Benchmarks of the engine and the Serve graph: `python -m benchmarks`.

Nothing is imported here eagerly: `python -m benchmarks --gpu` runs where only the engine's
dependencies are installed (no Ray, no merge jobs).
"""

from __future__ import annotations

from typing import Any

__all__ = ["BenchSettings", "engine_benchmarks"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from benchmarks import core

        return getattr(core, name)
    raise AttributeError(f"module 'benchmarks' has no attribute {name!r}")
