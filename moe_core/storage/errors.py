"""What storage raises: something missing or inconsistent, the store out of reach, a lost state write."""

from __future__ import annotations

__all__ = ["StateConflict", "StorageError", "StorageUnavailable", "describe"]


class StorageError(RuntimeError):
    """Storage is missing something or holds something inconsistent."""


class StorageUnavailable(StorageError):
    """The storage itself cannot be read (a volume unmounted, a bucket unreachable): unlike a name with
    no published version, this says nothing about the adapter. Readers keep serving what they hold."""


class StateConflict(StorageError):
    """A state write lost a compare-and-swap: another writer changed the state since it was read."""


def describe(e: BaseException) -> str:
    """An error for a message: botocore's say nothing of their kind, so it is named."""
    return f"{type(e).__name__}: {e}"
