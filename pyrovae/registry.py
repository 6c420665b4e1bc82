"""A name → constructor registry, so a new prior or likelihood is a new entry, not a new ``if``."""

from __future__ import annotations

from typing import Callable, Generic, TypeVar

from .errors import PyrovaeError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to constructors.

    >>> PRIORS = Registry("prior")
    >>> @PRIORS.register("normal")
    ... def normal(latent_dim): ...
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Callable[..., T]] = {}

    def register(self, name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        def add(constructor: Callable[..., T]) -> Callable[..., T]:
            if name in self._entries:
                raise PyrovaeError(f"a {self.kind} named {name!r} is already registered")
            self._entries[name] = constructor
            return constructor

        return add

    def __getitem__(self, name: str) -> Callable[..., T]:
        try:
            return self._entries[name]
        except KeyError:
            raise PyrovaeError(
                f"unknown {self.kind} {name!r}; known: {', '.join(sorted(self._entries))}"
            ) from None

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def names(self) -> list[str]:
        return sorted(self._entries)
