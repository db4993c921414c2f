"""The engine's input errors. They sit below everything that raises them (spec checks, the family registry, the
request card), so none of those imports another to raise them."""
from __future__ import annotations


class ModelSpecError(ValueError):
    """A model spec that cannot work, with the reason."""


class RequestError(ValueError):
    """A request value the model cannot take. `param` names the request field, so no caller parses the text."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param, self.message = param, message


class Cancelled(RuntimeError):
    """Raised at a step boundary (or between a decode's chunks) when the request's `should_cancel` returned True."""
