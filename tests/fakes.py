"""Test doubles shared by several test files."""
from __future__ import annotations

from typing import Any


class _Method:
    def __init__(self, fn: Any) -> None:
        self.fn = fn

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        async def run() -> Any:
            return self.fn(*args, **kwargs)
        return run()


class FakeStoreHandle:
    """The real SQLite store behind an object shaped like a Serve handle (`await handle.op.remote(...)`)."""

    def __init__(self, store: Any) -> None:
        self.store = store

    def __getattr__(self, name: str) -> _Method:
        return _Method(getattr(self.store, name))
