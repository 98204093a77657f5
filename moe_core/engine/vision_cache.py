"""The vision-feature cache: an image's features kept by what decided them, for the next row that shows it.

The key is the image's content hash (of the pixels as the model sees them, which fixes its size and
grid) and the vision tower's identity: the base tower, or an adapter with vision-tower weights named by
its content identity. A reloaded adapter under the same name is a new identity, so its rows never get
the old version's features (vLLM #44939). A routed request's classification and its answer run the
tower once; an agent's next turn skips the tower for screenshots its cached pages already cover, and
finds the others here when they are still kept.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

__all__ = ["FeatureCache", "Features", "VisionKey"]

#: (image content key, vision identity): None is the base tower
VisionKey = tuple[str, str | None]
#: (pooled features [tokens, hidden], deepstack features: one [tokens, hidden] per deepstack layer)
Features = tuple[torch.Tensor, tuple[torch.Tensor, ...]]


class FeatureCache:
    """The last ``capacity`` images' features, least recently used out first."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: OrderedDict[VisionKey, Features] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: object) -> bool:
        """Whether ``key`` is kept now (no effect on its recency; safe to ask from another thread)."""
        return key in self._items

    def get(self, key: VisionKey) -> Features | None:
        found = self._items.get(key)
        if found is None:
            return None
        self._items.move_to_end(key)
        return found

    def put(self, key: VisionKey, features: Features) -> None:
        if self.capacity <= 0:
            return
        self._items[key] = features
        self._items.move_to_end(key)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def clear(self) -> None:
        self._items.clear()
