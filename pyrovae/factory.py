"""Model factories: ``FILE.py:NAME`` or ``package.module:NAME``, called as
``NAME(data_dim=P, image_shape=(C, H, W) or None, **model_args)``, returning an object with Pyro
programs ``model(x)`` and ``guide(x)`` (usually an ``nn.Module``).

Loading a model file runs its code, as ``python FILE.py`` would.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import json
import sys
from pathlib import Path
from typing import Any, Callable

from .errors import ContractError, PyrovaeError

BUILTIN = "pyrovae.models:vae"


def parse_model_args(items: list[str] | None, flag: str = "--model-arg") -> dict[str, Any]:
    """``["latent_dim=8", "name=x"]`` → {"latent_dim": 8, "name": "x"}: JSON where it parses, else a string."""
    args = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise PyrovaeError(f"{flag} {item!r} is not KEY=VALUE with KEY a Python name")
        try:
            args[key] = json.loads(value)
        except json.JSONDecodeError:
            args[key] = value
    return args


def sha256(path: str | Path) -> str:
    """SHA-256 of a file, read in blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def split_reference(ref: str) -> tuple[str, str]:
    where, sep, name = ref.rpartition(":")
    if not sep or not where or not name.isidentifier():
        raise PyrovaeError(f"--model {ref!r}: give FILE.py:NAME or package.module:NAME")
    return where, name


def is_file_reference(ref: str) -> bool:
    return split_reference(ref)[0].endswith(".py")


def load(ref: str) -> Callable:
    """The factory a reference names; a file's syntax error, an import error or a missing name
    becomes a one-line PyrovaeError naming the file."""
    where, name = split_reference(ref)
    if where.endswith(".py"):
        path = Path(where)
        if not path.is_file():
            raise PyrovaeError(f"model file not found: {path}")
        module_name = f"pyrovae_user_model_{sha256(path)[:16]}"
        spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module  # dataclasses and pickling look modules up by name
        try:
            spec.loader.exec_module(module)
        except SyntaxError as e:
            del sys.modules[module_name]
            raise PyrovaeError(f"{path}, line {e.lineno}: syntax error: {e.msg}") from None
        except Exception as e:
            del sys.modules[module_name]
            raise PyrovaeError(f"{path} raised {type(e).__name__} while loading: {e}") from None
        what = str(path)
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as e:
            raise PyrovaeError(f"--model {ref!r}: cannot import {where}: {e}") from None
        what = where
    if not hasattr(module, name):
        found = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_") and getattr(v, "__module__", None) == module.__name__)
        raise PyrovaeError(f"{what} has no {name!r}; it defines: {', '.join(found) or 'nothing callable'}")
    factory = getattr(module, name)
    if not callable(factory):
        raise PyrovaeError(f"{what}:{name} is not callable: give a class or function that builds the model")
    return factory


def defaults(factory: Callable) -> dict[str, Any]:
    """The factory's keyword defaults that JSON can record (besides data_dim and image_shape)."""
    try:
        parameters = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return {}
    out = {}
    for p in parameters:
        if p.default is inspect.Parameter.empty or p.name in ("data_dim", "image_shape"):
            continue
        value = list(p.default) if isinstance(p.default, tuple) else p.default
        try:
            json.dumps(value)
        except TypeError:
            continue
        out[p.name] = value
    return out


COMPONENT_OPTIONS = {"prior_args": "--prior-arg", "guide_args": "--guide-arg", "likelihood_args": "--likelihood-arg"}
"""A factory's arguments that hold a component's options, and the flag that fills each."""


def check_args(factory: Callable, ref: str, args: dict[str, Any]) -> None:
    """Refuse, in one line naming the known ones, an argument the factory does not take (unless it
    takes ``**kwargs``); a component's options given to a factory without that component say so,
    and where it takes component options, the line says that a component's own arguments go there."""
    try:
        parameters = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return
    known = [p.name for p in parameters if p.name not in ("data_dim", "image_shape") and p.kind is not inspect.Parameter.VAR_POSITIONAL]
    unknown = [name for name in args if name not in known]
    if not unknown:
        return
    listed = ", ".join(known) or "none"
    if unknown[0] in COMPONENT_OPTIONS:
        raise PyrovaeError(f"the model factory {ref} takes no {unknown[0]} ({COMPONENT_OPTIONS[unknown[0]]}): "
                           f"its {unknown[0].split('_')[0]} is not chosen by name; its arguments: {listed}")
    flags = [f"{COMPONENT_OPTIONS[name]} ({name})" for name in COMPONENT_OPTIONS if name in known]
    where = f" (a component's own options: {', '.join(flags)} NAME=VALUE)" if flags else ""
    raise PyrovaeError(f"the model factory {ref} has no argument {unknown[0]!r}; its arguments: {listed}{where}")


def build(factory: Callable, ref: str, data_dim: int, image_shape, args: dict[str, Any]):
    """``factory(data_dim=..., image_shape=..., **args)``, checked to have ``model`` and ``guide``;
    an argument the factory does not take is refused by :func:`check_args`."""
    check_args(factory, ref, args)
    try:
        obj = factory(data_dim=data_dim, image_shape=None if image_shape is None else tuple(image_shape), **args)
    except PyrovaeError:
        raise
    except Exception as e:
        raise ContractError(f"the model factory {ref} raised {type(e).__name__}: {e}") from None
    for program in ("model", "guide"):
        if not callable(getattr(obj, program, None)):
            raise ContractError(f"the model factory {ref} returned a {type(obj).__name__} without a callable {program}(x)")
    return obj
