"""Name -> factory registries, so sweeps can pick datasets, models, prompts and methods by string."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class UnknownNameError(ValueError):
    """Raised for a name that is not registered; the message lists the allowed names."""


class Registry(Generic[T]):
    """A mapping from names to factories with helpful errors.

    >>> PROMPTS = Registry("prompt")
    >>> @PROMPTS.register("pad")
    ... def make_pad(): ...
    >>> PROMPTS.get("pda")  # raises UnknownNameError: unknown prompt 'pda'; choose from pad
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            self.add(name, obj)
            return obj

        return decorator

    def add(self, name: str, obj: T) -> None:
        if name in self._items:
            raise ValueError(f"{self.kind} '{name}' is already registered")
        self._items[name] = obj

    def check(self, name: str, field: str | None = None) -> str:
        """Return ``name`` if registered, else raise an error naming ``field`` and the choices."""
        if name not in self._items:
            label = field or self.kind
            raise UnknownNameError(
                f"{label}: unknown {self.kind} '{name}'; choose from {', '.join(self.names())}"
            )
        return name

    def get(self, name: str, field: str | None = None) -> T:
        return self._items[self.check(name, field)]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)
