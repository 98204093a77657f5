"""The embedded demo: synthetic screens and adapters trained on the built-in tiny model."""

from moe_demo.screens import GRID, PROMPTS, SCREEN_TYPES, Screen, make_screen, split

__all__ = ["GRID", "PROMPTS", "SCREEN_TYPES", "Screen", "make_screen", "split"]
