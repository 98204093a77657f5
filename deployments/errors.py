"""The client's errors, as the gateway and the model deployments raise them (no Ray, no model)."""

from __future__ import annotations

__all__ = ["BadInput"]


class BadInput(ValueError):
    """Client error: ``field`` names the offending request field; ``status`` the HTTP code."""

    def __init__(self, field: str, message: str, status: int = 422) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message
        self.status = status

    def __reduce__(self) -> tuple[type[BadInput], tuple[str, str, int]]:
        """Pickled whole: a deployment's BadInput reaches the gateway across the handle as itself."""
        return (BadInput, (self.field, self.message, self.status))
