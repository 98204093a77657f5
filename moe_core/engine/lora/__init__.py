"""Multi-LoRA serving: stacked adapter slots on the base model's linears (S-LoRA/Punica style)."""

from moe_core.engine.lora.layer import SlotBatch, SlottedLinear
from moe_core.engine.lora.slots import LoraSlots, ParsedAdapter, SlotError, parse_adapter

__all__ = ["LoraSlots", "ParsedAdapter", "SlotBatch", "SlotError", "SlottedLinear", "parse_adapter"]
