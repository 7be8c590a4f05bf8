"""Name -> callable registries for the swappable strategies.

Every strategy family (prune, grow, redistribute, schedules, distributions, patterns, models,
datasets) is a :class:`Registry`. A user passes either a registered name or a callable; an unknown
name raises a ``ValueError`` that lists the valid names.
"""
from __future__ import annotations

from typing import Callable, Dict, Generic, Iterator, TypeVar, Union

T = TypeVar("T")


class Registry(Generic[T]):
    """A named collection of strategies of one kind.

    Args:
        kind: what the entries are, used in error messages (e.g. ``"grow"``).
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: Dict[str, T] = {}

    def register(self, name: str | None = None) -> Callable[[T], T]:
        """Decorator that registers ``fn`` under ``name`` (default: its ``__name__``)."""

        def deco(fn: T) -> T:
            key = name or getattr(fn, "__name__")
            if key in self._entries:
                raise ValueError(f"{self.kind} {key!r} is registered twice")
            self._entries[key] = fn
            return fn

        return deco

    def add(self, name: str, fn: T) -> T:
        """Registers ``fn`` under ``name`` without a decorator."""
        return self.register(name)(fn)

    def get(self, name_or_fn: Union[str, T], argument: str | None = None) -> T:
        """Returns the registered entry, or ``name_or_fn`` itself when it is callable.

        Args:
            name_or_fn: a registered name or a callable.
            argument: the user-facing argument name, quoted in the error.

        Raises:
            ValueError: unknown name; the message lists the valid names.
        """
        if callable(name_or_fn) and not isinstance(name_or_fn, str):
            return name_or_fn
        if isinstance(name_or_fn, str) and name_or_fn in self._entries:
            return self._entries[name_or_fn]
        arg = argument or self.kind
        raise ValueError(
            f"unknown {self.kind} {name_or_fn!r} for argument {arg!r}; "
            f"valid names: {', '.join(sorted(self._entries))} (or pass a callable)"
        )

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)
