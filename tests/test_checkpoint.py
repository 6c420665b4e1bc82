"""Checkpoints: loading runs no code from the file, damage is reported by name, and a failed
write leaves the previous checkpoint byte for byte as it was."""

import builtins
import errno
import hashlib
import io
import os
import pickle
import stat
import zipfile

import pytest
import torch

from pyrovae import checkpoint
from pyrovae.errors import PyrovaeError

STATE = {"epoch": 3, "model": {"w": torch.arange(6.0).reshape(2, 3)}, "rng": torch.get_rng_state(), "config": {"lr": 1e-3}}


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


# ---------------------------------------------------------------- loading runs no code


class Payload:
    """Unpickling this calls ``function(*args)``: the way a crafted checkpoint runs its code."""

    def __init__(self, function, *args):
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


def payloads(marker):
    return {
        "os.system": Payload(os.system, f"touch '{marker}'"),
        "builtins.open": Payload(builtins.open, str(marker), "w"),
    }


PICKLED_AS = {"os.system": f"{os.name}.system", "builtins.open": "io.open"}  # the names a pickle imports them by


WRITERS = {
    "torch.save": lambda obj, f: torch.save(obj, f),
    "torch.save-legacy-format": lambda obj, f: torch.save(obj, f, _use_new_zipfile_serialization=False),
    "raw-pickle-protocol-2": lambda obj, f: pickle.dump(obj, f, protocol=2),
    "raw-pickle-highest-protocol": lambda obj, f: pickle.dump(obj, f, protocol=pickle.HIGHEST_PROTOCOL),
}


@pytest.mark.parametrize("payload", ["os.system", "builtins.open"])
@pytest.mark.parametrize("writer", list(WRITERS))
def test_a_checkpoint_with_pickled_code_is_refused_and_runs_nothing(tmp_path, monkeypatch, writer, payload):
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # must not weaken an explicit weights_only=True
    marker = tmp_path / "executed"
    path = tmp_path / "checkpoint.pt"
    with open(path, "wb") as f:
        WRITERS[writer]({"epoch": 1, "model": payloads(marker)[payload]}, f)
    with pytest.raises(PyrovaeError) as error:
        checkpoint.load(path)
    assert not marker.exists()
    assert one_line(error).startswith(
        f"checkpoint {path} holds code or objects that are not plain tensors ({PICKLED_AS[payload]}) and was not loaded:"
    )


class Settings:
    """An ordinary object: harmless here, but loading it would mean importing and calling its class."""

    def __init__(self):
        self.lr = 1e-3


def test_a_checkpoint_holding_an_object_is_refused_and_names_its_class(tmp_path):
    path = tmp_path / "checkpoint.pt"
    torch.save({"epoch": 1, "config": Settings()}, path)
    with pytest.raises(PyrovaeError) as error:
        checkpoint.load(path)
    assert f"not plain tensors ({__name__}.Settings) and was not loaded" in one_line(error)


def test_the_crafted_checkpoint_does_run_code_under_a_plain_unpickler(tmp_path):
    """The control experiment: the payload above is live, so its absence above is the loader's doing."""
    marker = tmp_path / "executed"
    pickle.loads(pickle.dumps(payloads(marker)["builtins.open"])).close()
    assert marker.exists()


# ---------------------------------------------------------------- damaged files


def truncated_pickle_in_zip(good: bytes) -> bytes:
    """The same zip archive with its data.pkl member cut in half (the archive itself is well formed)."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(good)) as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            dst.writestr(info, data[: len(data) // 2] if info.filename.endswith("data.pkl") else data)
    return out.getvalue()


DAMAGE = {
    "truncated-to-half": lambda good: good[: len(good) // 2],
    "truncated-to-ten-bytes": lambda good: good[:10],
    "empty": lambda good: b"",
    "not-a-torch-file": lambda good: b"not a torch file",
    "truncated-pickle-inside-the-zip": truncated_pickle_in_zip,
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_checkpoint_is_reported_by_name(tmp_path, damage):
    path = tmp_path / "checkpoint.pt"
    checkpoint.save_atomic(STATE, path)
    path.write_bytes(DAMAGE[damage](path.read_bytes()))
    with pytest.raises(PyrovaeError) as error:
        checkpoint.load(path)
    assert one_line(error).startswith(f"cannot read checkpoint {path}: the file is corrupt or truncated (")


def test_a_valid_checkpoint_loads_as_saved(tmp_path):
    path = tmp_path / "checkpoint.pt"
    checkpoint.save_atomic(STATE, path)
    loaded = checkpoint.load(path, map_location="cpu")
    assert loaded.keys() == STATE.keys()
    assert torch.equal(loaded["model"]["w"], STATE["model"]["w"]) and torch.equal(loaded["rng"], STATE["rng"])
    assert (loaded["epoch"], loaded["config"]) == (STATE["epoch"], STATE["config"])


# ---------------------------------------------------------------- writing


def test_save_writes_a_synced_temporary_in_the_folder_then_renames_then_syncs_the_folder(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    events = []
    fsync, replace = os.fsync, os.replace

    def recording_fsync(fd):
        st = os.fstat(fd)
        events.append(("fsync", "folder" if stat.S_ISDIR(st.st_mode) else "file", st.st_ino, st.st_size))
        return fsync(fd)

    def recording_replace(src, dst):
        events.append(("replace", os.path.dirname(src), os.path.basename(src), os.fspath(dst)))
        return replace(src, dst)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(os, "replace", recording_replace)
    checkpoint.save_atomic(STATE, path)
    monkeypatch.undo()

    assert [e[:2] for e in events] == [("fsync", "file"), ("replace", str(tmp_path)), ("fsync", "folder")]
    _, _, file_inode, synced_size = events[0]
    _, _, tmp_name, target = events[1]
    assert (file_inode, synced_size) == (path.stat().st_ino, path.stat().st_size)  # the whole file, synced before the rename
    assert tmp_name.startswith(".checkpoint.pt.") and target == str(path)
    assert events[2][2] == tmp_path.stat().st_ino
    assert os.listdir(tmp_path) == ["checkpoint.pt"]


@pytest.fixture
def umask():
    """Set the process's umask for one test; restored afterwards."""
    previous = os.umask(0o022)
    os.umask(previous)
    yield os.umask
    os.umask(previous)


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002], ids=["022", "077", "002"])
def test_the_checkpoint_has_the_mode_of_a_normally_created_file(tmp_path, monkeypatch, umask, mask):
    umask(mask)
    normal = tmp_path / "normal"
    normal.write_bytes(b"")
    expected = stat.S_IMODE(normal.stat().st_mode)
    assert expected == 0o666 & ~mask
    modes_while_writing = []
    save = torch.save

    def inspecting_save(obj, f, *args, **kwargs):
        modes_while_writing.append(stat.S_IMODE(os.fstat(f.fileno()).st_mode))
        return save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", inspecting_save)
    path = tmp_path / "checkpoint.pt"
    checkpoint.save_atomic(STATE, path)
    assert modes_while_writing == [expected]
    assert stat.S_IMODE(path.stat().st_mode) == expected
    if mask == 0o022:
        assert expected == 0o644


def enospc():
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


class FullDisk(io.RawIOBase):
    """A file that takes ``room`` bytes, then fails as a full disk does."""

    def __init__(self, f, room):
        self.f, self.room = f, room

    def writable(self):
        return True

    def write(self, data):
        if len(data) > self.room:
            raise enospc()
        self.room -= len(data)
        return self.f.write(data)

    def fileno(self):
        return self.f.fileno()


def torch_save_fails_midway(monkeypatch):
    """torch.save itself raises ENOSPC after writing part of the file."""

    def failing(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise enospc()

    monkeypatch.setattr(torch, "save", failing)


def disk_fills_under_torch_save(monkeypatch):
    """The file runs out of room while torch writes it (torch reports a RuntimeError raised during the OSError)."""
    save = torch.save
    monkeypatch.setattr(torch, "save", lambda obj, f, *a, **k: save(obj, FullDisk(f, 300), *a, **k))


def fsync_fails(monkeypatch):
    def failing(fd):
        raise enospc()

    monkeypatch.setattr(os, "fsync", failing)


def replace_fails(monkeypatch):
    def failing(src, dst):
        raise enospc()

    monkeypatch.setattr(os, "replace", failing)


FAILURES = {
    "torch.save-raises": torch_save_fails_midway,
    "disk-fills-under-torch.save": disk_fills_under_torch_save,
    "fsync-raises": fsync_fails,
    "replace-raises": replace_fails,
}


@pytest.mark.parametrize("failure", list(FAILURES))
def test_a_failed_save_names_the_path_and_the_os_error_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch, failure):
    path = tmp_path / "checkpoint.pt"
    checkpoint.save_atomic(STATE, path)
    before = digest(path)
    FAILURES[failure](monkeypatch)
    with pytest.raises(PyrovaeError) as error:
        checkpoint.save_atomic({**STATE, "epoch": 4}, path)
    monkeypatch.undo()
    assert one_line(error).startswith(f"cannot write checkpoint {path}: No space left on device (ENOSPC)")
    assert isinstance(error.value, OSError) and error.value.errno == errno.ENOSPC
    assert digest(path) == before
    assert os.listdir(tmp_path) == ["checkpoint.pt"]  # no temporary left behind
    assert checkpoint.load(path)["epoch"] == 3


def test_a_save_into_a_removed_folder_names_the_path_and_the_error(tmp_path):
    path = tmp_path / "run" / "checkpoint.pt"
    with pytest.raises(PyrovaeError) as error:
        checkpoint.save_atomic(STATE, path)
    assert one_line(error).startswith(f"cannot write checkpoint {path}: No such file or directory (ENOENT)")
    assert os.listdir(tmp_path) == []


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="permission bits do not stop root")
def test_a_save_into_a_read_only_folder_names_the_path_and_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "checkpoint.pt"
    checkpoint.save_atomic(STATE, path)
    before = digest(path)
    tmp_path.chmod(0o555)
    try:
        with pytest.raises(PyrovaeError) as error:
            checkpoint.save_atomic({**STATE, "epoch": 4}, path)
    finally:
        tmp_path.chmod(0o755)
    assert one_line(error).startswith(f"cannot write checkpoint {path}: Permission denied (EACCES)")
    assert digest(path) == before
    assert os.listdir(tmp_path) == ["checkpoint.pt"]


def test_a_save_on_a_read_only_file_system_names_the_path_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    checkpoint.save_atomic(STATE, path)
    before = digest(path)
    real_open = os.open

    def read_only_open(file, flags, *args, **kwargs):
        if flags & os.O_CREAT:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(file))
        return real_open(file, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only_open)
    with pytest.raises(PyrovaeError) as error:
        checkpoint.save_atomic({**STATE, "epoch": 4}, path)
    monkeypatch.undo()
    assert one_line(error).startswith(f"cannot write checkpoint {path}: Read-only file system (EROFS)")
    assert digest(path) == before


def test_a_folder_that_cannot_be_synced_does_not_fail_the_save(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    fsync = os.fsync

    def files_only(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        return fsync(fd)

    monkeypatch.setattr(os, "fsync", files_only)
    checkpoint.save_atomic(STATE, path)
    monkeypatch.undo()
    assert checkpoint.load(path)["epoch"] == 3


@pytest.mark.parametrize("error", [KeyboardInterrupt(), pickle.PicklingError("cannot pickle")], ids=["interrupt", "unpicklable"])
def test_an_error_that_is_not_the_disks_passes_through_and_cleans_up(tmp_path, monkeypatch, error):
    path = tmp_path / "checkpoint.pt"
    checkpoint.save_atomic(STATE, path)
    before = digest(path)

    def failing_save(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise error

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(type(error)) as raised:
        checkpoint.save_atomic({**STATE, "epoch": 4}, path)
    monkeypatch.undo()
    assert not isinstance(raised.value, PyrovaeError)
    assert digest(path) == before
    assert os.listdir(tmp_path) == ["checkpoint.pt"]
