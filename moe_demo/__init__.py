"""The embedded demo: synthetic screens and adapters trained on the built-in tiny model."""

from moe_demo.screens import GRID, PROMPTS, SCREEN_TYPES, Screen, make_screen, split

__all__ = ["GRID", "PROMPTS", "SCREEN_TYPES", "Screen", "flush_subnormals", "make_screen", "split"]


def flush_subnormals() -> None:
    """Flush subnormal floats to zero in this process's CPU arithmetic. Training makes many (attention's
    tails, Adam's small moments) and they are slow on a CPU: the document model's 3000 steps take 65 s
    with them flushed, 144 s without. The setting is a thread's, and a parallel region's worker threads
    take it from the thread that starts them, once: so it is set before any parallel work, by the build's
    entry point (``python -m moe_demo build``; the test session runs that too). Set later, or in a thread
    of the build's own, training kept going at half speed in trials. Only for a process that just builds:
    it breaks IEEE arithmetic for everything else in it (hypothesis, for one, refuses to run)."""
    import torch

    torch.set_flush_denormal(True)
