"""Checkpoints: written atomically, read without running code.

Writing: a checkpoint file is either the old one or the complete new one, never half written.
Reading: ``torch.load(weights_only=True)`` accepts tensors, numbers, strings and containers of
them, and refuses anything a pickle would have to import or call to rebuild, so opening a file
from elsewhere cannot run its code.
"""

from __future__ import annotations

import errno
import os
import pickle
import pickletools
import re
import secrets
import warnings
import zipfile
from pathlib import Path

import torch

from .errors import PyrovaeError


class CheckpointWriteError(PyrovaeError, OSError):
    """A checkpoint could not be written; the previous one is unchanged.

    Also an :class:`OSError` (with the failed call's ``errno``), so code that caught the
    operating system's error still catches this one.
    """


def save_atomic(obj, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file in the same folder, then rename it over ``path``.

    The temporary file is created the way ``open(..., "w")`` creates a file (mode 0666 less the
    umask), flushed and fsynced before ``os.replace``; the folder is fsynced after it (best effort),
    so the rename survives a crash. If writing fails, the temporary file is removed, ``path`` keeps
    its previous contents, and an OS error (disk full, a removed or read-only folder) is raised as
    :class:`CheckpointWriteError` naming ``path``.
    """
    path = Path(path)
    tmp: Path | None = None
    try:
        fd, tmp = create_temporary(path)
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            try:
                tmp.unlink(missing_ok=True)
            except OSError:  # the folder went away or became read-only: nothing left to clean
                pass
        os_error = _os_error_in(e) if isinstance(e, Exception) else None
        if os_error is None:  # an interrupt, or an object torch.save cannot write: not the disk's fault
            raise
        error = CheckpointWriteError(
            f"cannot write checkpoint {path}: {_describe(os_error)}; the previous checkpoint, if any, is unchanged"
        )
        error.errno = os_error.errno
        raise error from e
    _fsync_folder(path.parent)


def create_temporary(path: Path) -> tuple[int, Path]:
    """A new file beside ``path``, opened for writing; unlike ``tempfile.mkstemp`` (mode 0600)
    the mode is 0666 less the umask, as for any file the process creates."""
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name beside {path}")


def _fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable where the platform allows it (not on Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot sync a folder
        pass
    finally:
        os.close(fd)


def _os_error_in(error: BaseException) -> OSError | None:
    """``error`` if it is an OSError, else the first OSError it was raised from or during
    (torch.save reports a failed write as a RuntimeError raised while handling the OSError)."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, OSError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def _describe(error: OSError) -> str:
    """"No space left on device (ENOSPC)"; the message itself for an OSError without errno."""
    if error.strerror and error.errno:
        return f"{error.strerror} ({errno.errorcode.get(error.errno, error.errno)})"
    return _first_line(error)


def load(path: str | os.PathLike, map_location=None) -> dict:
    """The checkpoint at ``path``, read with ``torch.load(weights_only=True)``.

    A file holding anything but tensors, numbers, strings and containers of them (pickled code
    or objects) is refused without running any of it; a corrupt or truncated file is reported
    by name. Both raise :class:`PyrovaeError` with a one-line message.
    """
    path = Path(path)
    if not path.is_file():
        raise PyrovaeError(f"no checkpoint at {path}: train first (pyrovae train) or point at a run folder that has one")
    try:
        with warnings.catch_warnings():  # a raw pickle's protocol: it is refused below, with a clearer message
            warnings.filterwarnings("ignore", "Detected pickle protocol", UserWarning)
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise _unreadable(path, e) from None


def _unreadable(path: Path, error: Exception) -> PyrovaeError:
    """The one-line error for a checkpoint that ``torch.load`` could not read."""
    damage, imports = _scan(path)
    if damage is not None:
        return PyrovaeError(f"cannot read checkpoint {path}: the file is corrupt or truncated ({damage})")
    if isinstance(error, pickle.UnpicklingError) and "Weights only load failed" in str(error):
        foreign = [name for name in imports if name.split(".")[0] not in _TENSOR_MODULES]
        named = foreign or re.findall(r"GLOBAL ([\w.]+)", str(error))  # else what torch says it refused
        what = f" ({', '.join(sorted(set(named)))})" if named else ""
        return PyrovaeError(
            f"checkpoint {path} holds code or objects that are not plain tensors{what} and was not loaded: "
            "pyrovae loads only tensors, numbers, strings and containers of them, so that opening a file cannot run code"
        )
    return PyrovaeError(f"cannot read checkpoint {path}: {_first_line(error)}")


_TENSOR_MODULES = {"torch", "collections", "_codecs"}
"""Modules whose names a plain ``torch.save`` of tensors and containers imports."""


def _scan(path: Path) -> tuple[str | None, list[str]]:
    """What is broken in the file's pickle stream (``*/data.pkl`` in torch's zip format, else the
    whole file), None if it parses to its end; and the names it would import. Only decodes
    opcodes (``pickletools``): imports and calls nothing."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
            if not head:
                return "the file is empty", []
            if head != b"PK\x03\x04":  # not a zip archive: a raw pickle stream
                f.seek(0)
                return _scan_pickle(f)
        if not zipfile.is_zipfile(path):
            return "a zip archive without its directory", []
        with zipfile.ZipFile(path) as archive:
            member = next((n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"), None)
            if member is None:
                return "a zip archive without data.pkl", []
            with archive.open(member) as f:
                return _scan_pickle(f)
    except (OSError, EOFError, zipfile.BadZipFile) as e:
        return _first_line(e), []


def _scan_pickle(f) -> tuple[str | None, list[str]]:
    imports, strings = [], []
    try:
        for opcode, arg, _ in pickletools.genops(f):
            if opcode.name == "GLOBAL":  # arg "module name"
                imports.append(arg.replace(" ", "."))
            elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:  # module and name pushed just before
                imports.append(".".join(strings[-2:]))
            if isinstance(arg, str) and opcode.name != "GLOBAL":
                strings.append(arg)
    except Exception as e:  # an unknown opcode, a truncated argument, no STOP
        return _first_line(e), imports
    return None, imports


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
