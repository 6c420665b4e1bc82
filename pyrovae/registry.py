"""A name → constructor registry, so a new prior or likelihood is a new entry, not a new ``if``.

A constructor's keyword arguments are of two kinds: the *context* the builder supplies (e.g. a
prior's ``latent_dim`` and ``encoder``, named when the registry is made), and the *options* a user
may set (e.g. the VampPrior's ``components``), every other argument with a default. Options reach
the command line as ``--prior-arg NAME=VALUE`` and are checked here: an unknown name is refused in
one line that lists the known ones.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Generic, Iterable, TypeVar

from .errors import PyrovaeError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to constructors: the registries ``PRIORS`` and ``LIKELIHOODS``
    (:mod:`pyrovae.models`), ``GUIDES`` (:mod:`pyrovae.guides`) and ``MODELS`` (whole models, for
    ``--model NAME``) are instances.

    ``kind`` names what is registered, in messages (``"prior"``); ``context`` names the keyword
    arguments the builder supplies (``latent_dim``, ``data_dim``, ...), which are not options a user
    sets. Registering a name twice, or asking for an unknown one, raises
    :class:`~pyrovae.errors.PyrovaeError` (the latter listing the known names).

    >>> PRIORS = Registry("prior", context=("latent_dim",))
    >>> @PRIORS.register("normal")
    ... def normal(latent_dim, scale=1.0): ...
    >>> PRIORS.options("normal")
    {'scale': 1.0}
    """

    def __init__(self, kind: str, context: Iterable[str] = ()):
        self.kind = kind
        self.context = tuple(context)
        self._entries: dict[str, Callable[..., T]] = {}

    def register(self, name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        """A decorator that registers a constructor (a class or a function) as ``name`` and returns it
        unchanged; a name already registered is refused."""

        def add(constructor: Callable[..., T]) -> Callable[..., T]:
            if name in self._entries:
                raise PyrovaeError(f"a {self.kind} named {name!r} is already registered")
            self._entries[name] = constructor
            return constructor

        return add

    def __getitem__(self, name: str) -> Callable[..., T]:
        """The constructor registered as ``name``; an unknown name's error lists the known ones."""
        try:
            return self._entries[name]
        except KeyError:
            raise PyrovaeError(
                f"unknown {self.kind} {name!r}; known: {', '.join(sorted(self._entries))}"
            ) from None

    def options(self, name: str) -> dict[str, Any]:
        """The user-settable arguments of ``name`` and their defaults: the constructor's keyword
        arguments with a default, less the context the builder supplies."""
        return {p.name: p.default for p in _parameters(self[name])
                if p.default is not inspect.Parameter.empty and p.name not in self.context
                and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)}

    def check_options(self, name: str, options: dict[str, Any] | None) -> dict[str, Any]:
        """``options`` if every name is an option of ``name``; else a one-line error listing the known ones."""
        options = dict(options or {})
        known = self.options(name)
        unknown = [k for k in options if k not in known]
        if unknown:
            listed = ", ".join(known) if known else "none"
            raise PyrovaeError(f"unknown argument {unknown[0]!r} for {self.kind} {name!r}; its arguments: {listed}")
        return options

    def build(self, name: str, options: dict[str, Any] | None = None, **context) -> T:
        """Call the constructor registered as ``name`` with the keyword arguments of ``context``
        that it accepts (all of them if it takes ``**kwargs``) and the user's ``options`` (checked
        by :meth:`check_options`): a prior that needs only ``latent_dim`` need not declare
        ``data_dim`` or ``encoder``."""
        constructor = self[name]
        options = self.check_options(name, options)
        parameters = _parameters(constructor)
        kinds = {p.kind for p in parameters}
        if inspect.Parameter.VAR_KEYWORD not in kinds or inspect.Parameter.VAR_POSITIONAL in kinds:  # (*args, **kwargs): nn.Module's own
            names = {p.name for p in parameters}
            context = {k: v for k, v in context.items() if k in names}
        return constructor(**context, **options)

    def describe(self) -> list[tuple[str, str]]:
        """(name, first sentence of the constructor's docstring) for each entry."""
        return [(name, _first_sentence(self._entries[name])) for name in self.names()]

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def names(self) -> list[str]:
        """The registered names, sorted."""
        return sorted(self._entries)


def _parameters(constructor: Callable) -> list[inspect.Parameter]:
    try:
        return list(inspect.signature(constructor).parameters.values())
    except (TypeError, ValueError):  # a builtin without a signature
        return []


def _first_sentence(obj) -> str:
    doc = inspect.getdoc(obj) or ""
    first = doc.split("\n\n", 1)[0].replace("\n", " ").strip()
    return first.split(". ", 1)[0].rstrip(".") if first else ""
