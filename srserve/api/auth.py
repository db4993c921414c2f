"""API keys: who a request comes from (`Caller`), read from a keys file (`KeyRing`).

The keys file (a mounted Kubernetes Secret, say) holds one key per line, with optional flags:

    # name:key [admin] [priority=interactive|batch] [max_in_flight=N] [max_per_minute=N] [max_cost_in_flight=X]
    alice:sk-3f9a...                      priority=batch max_in_flight=4
    ops:sk-77c0...                        admin

A quota flag set to `none` lifts that limit for the key. Keys are never kept, logged or shown: the ring holds
their SHA-256 digests, every error names the line and never the text of a key, and records carry the key's name.
"""
from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass, field
from typing import Any, Callable

__all__ = ["ANONYMOUS", "Caller", "KeyRing"]

_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_KEY = re.compile(r"[\x21-\x7e]{1,512}")  # printable ASCII, no spaces: flags follow after whitespace
PRIORITIES = ("interactive", "batch")


@dataclass(frozen=True)
class Caller:
    """The authenticated client of one request. `quota`: per-key overrides of `QuotaOptions` fields."""

    name: str                       # the key's name; "anonymous" when no auth is configured
    admin: bool = False             # sees every key's jobs
    priority: str = "interactive"   # "interactive" | "batch"
    quota: dict[str, Any] = field(default_factory=dict, hash=False)


ANONYMOUS = Caller("anonymous")


def _count(text: str) -> int:
    if not re.fullmatch(r"[0-9]{1,9}", text) or int(text) < 1:
        raise ValueError("must be a whole number >= 1 or none")
    return int(text)


def _cost(text: str) -> float:
    if not re.fullmatch(r"[0-9]{1,9}(\.[0-9]{1,6})?", text) or float(text) <= 0:
        raise ValueError("must be a number > 0 or none")
    return float(text)


_QUOTA_FLAGS: dict[str, Callable[[str], Any]] = {
    "max_in_flight": _count, "max_per_minute": _count, "max_cost_in_flight": _cost}
_FLAGS_HELP = "flags are admin, priority=interactive|batch, max_in_flight=N, max_per_minute=N, max_cost_in_flight=X"


def _ordinal(n: int) -> str:
    return f"{n}{'th' if 10 <= n % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"


def _parse_flags(flags: list[str]) -> dict[str, Any]:
    """Caller fields from a line's flags. Messages say which flag, never its text: a stray token after the key
    may be part of a key."""
    out: dict[str, Any] = {"admin": False, "priority": "interactive", "quota": {}}
    for index, flag in enumerate(flags, 1):
        name, eq, value = flag.partition("=")
        where = f"the {_ordinal(index)} flag"
        if flag == "admin":
            out["admin"] = True
        elif name == "priority" and eq:
            if value not in PRIORITIES:
                raise ValueError(f"{where}: priority must be interactive or batch")
            out["priority"] = value
        elif name in _QUOTA_FLAGS and eq:
            try:
                out["quota"][name] = None if value == "none" else _QUOTA_FLAGS[name](value)
            except ValueError as err:
                raise ValueError(f"{where}: {name} {err}") from None
        else:
            raise ValueError(f"{where} is not known; {_FLAGS_HELP}")
    return out


def _digest(key: str) -> bytes:
    # Fixed-length digests: compare_digest then takes the same time whatever the lengths of the two keys.
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


class KeyRing:
    """The configured keys, by digest. `authenticate` compares in constant time against every key."""

    def __init__(self, entries: list[tuple[bytes, Caller]]) -> None:
        if not entries:
            raise ValueError("the keys file holds no keys: every request would be refused")
        self._entries = entries

    @classmethod
    def parse(cls, text: str) -> "KeyRing":
        """The keys in a keys file's text; ValueError names the line (1-based) of a malformed line or of a
        name or key given twice."""
        entries: list[tuple[bytes, Caller]] = []
        names: dict[str, int] = {}
        digests: dict[bytes, int] = {}
        for number, raw in enumerate(text.splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            try:
                digest, caller = cls._parse_line(line)
            except ValueError as err:
                raise ValueError(f"keys file line {number}: {err}") from None
            if caller.name in names:
                raise ValueError(f"keys file line {number}: the name {caller.name!r} is already on line "
                                 f"{names[caller.name]}")
            if digest in digests:
                raise ValueError(f"keys file line {number}: the same key as line {digests[digest]} (each key "
                                 f"must be unique: it tells who the caller is)")
            names[caller.name], digests[digest] = number, number
            entries.append((digest, caller))
        return cls(entries)

    @staticmethod
    def _parse_line(line: str) -> tuple[bytes, Caller]:
        name, colon, rest = line.partition(":")
        name = name.strip()
        if not colon:
            raise ValueError("expected name:key [flags]")
        if not _NAME.fullmatch(name):
            raise ValueError("the name must be 1-64 characters of A-Z a-z 0-9 _ . -")
        if name == ANONYMOUS.name:  # the owner of every job made without keys (and of records from before them)
            raise ValueError(f"the name {ANONYMOUS.name!r} is reserved")
        tokens = rest.split()
        if not tokens:
            raise ValueError("the key is empty")
        key, flags = tokens[0], tokens[1:]
        if key == "admin" or key.partition("=")[0] in ("priority", *_QUOTA_FLAGS):
            raise ValueError("the key is missing (the first word after the name is a flag)")
        if not _KEY.fullmatch(key):
            raise ValueError("the key must be 1-512 printable ASCII characters")
        return _digest(key), Caller(name=name, **_parse_flags(flags))

    @classmethod
    def load(cls, path: str) -> "KeyRing":
        """The keys in the file at `path` (read once: a replica reads it at start)."""
        try:
            with open(path, encoding="utf-8") as file:
                text = file.read()
        except (OSError, UnicodeDecodeError) as err:
            raise ValueError(f"cannot read the keys file {path}: {type(err).__name__}") from None
        try:
            return cls.parse(text)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None

    def authenticate(self, authorization: str | None) -> Caller | None:
        """The caller an `Authorization: Bearer KEY` header names, or None. Every key is compared, with
        hmac.compare_digest over fixed-length digests, so the time taken tells neither which key matched nor how
        much of one did."""
        scheme, _, token = (authorization or "").strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return None
        candidate = _digest(token)
        found: Caller | None = None
        for digest, caller in self._entries:
            if hmac.compare_digest(candidate, digest) and found is None:
                found = caller
        return found

    @property
    def names(self) -> list[str]:
        return [caller.name for _, caller in self._entries]

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"KeyRing({len(self._entries)} keys: {', '.join(self.names)})"
