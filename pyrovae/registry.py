"""A name → constructor registry, so a new prior or likelihood is a new entry, not a new ``if``."""

from __future__ import annotations

import inspect
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

    def build(self, name: str, **context) -> T:
        """Call the constructor registered as ``name`` with the keyword arguments of ``context``
        that it accepts (all of them if it takes ``**kwargs``): a prior that needs only
        ``latent_dim`` need not declare ``data_dim`` or ``encoder``."""
        constructor = self[name]
        parameters = inspect.signature(constructor).parameters.values()
        kinds = {p.kind for p in parameters}
        if inspect.Parameter.VAR_KEYWORD not in kinds or inspect.Parameter.VAR_POSITIONAL in kinds:  # (*args, **kwargs): nn.Module's own
            names = {p.name for p in parameters}
            context = {k: v for k, v in context.items() if k in names}
        return constructor(**context)

    def describe(self) -> list[tuple[str, str]]:
        """(name, first sentence of the constructor's docstring) for each entry."""
        return [(name, _first_sentence(self._entries[name])) for name in self.names()]

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def names(self) -> list[str]:
        return sorted(self._entries)


def _first_sentence(obj) -> str:
    doc = inspect.getdoc(obj) or ""
    first = doc.split("\n\n", 1)[0].replace("\n", " ").strip()
    return first.split(". ", 1)[0].rstrip(".") if first else ""
