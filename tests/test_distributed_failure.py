"""A process of ``pyrovae train --nproc 2`` that dies ends the job, with a message and a non-zero
exit code, instead of leaving the other one waiting in a collective; the run folder stays intact."""

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

SMALL = ["--hidden", "16", "--latent-dim", "2", "--no-progress"]
HANG_GUARD = 120  # seconds; only there so that a hang fails the test instead of blocking it


def processes() -> dict[int, tuple[int, str, int]]:
    """pid → (ppid, state, start time) of every process in /proc."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # gone meanwhile
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # the name may hold spaces and parentheses
        found[int(entry.name)] = (int(fields[1]), fields[0], int(fields[19]))
    return found


def descendants(root: int) -> set[tuple[int, int]]:
    """(pid, start time) of every live descendant of ``root``."""
    table = processes()
    found, frontier = set(), [root]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, (ppid, state, _) in table.items() if ppid == parent and state != "Z"]
        found |= {(pid, table[pid][2]) for pid in children}
        frontier += children
    return found


def alive(known: set[tuple[int, int]]) -> set[tuple[int, int]]:
    """Those of ``known`` still running (the same pid with the same start time, not a zombie)."""
    table = processes()
    return {(pid, start) for pid, start in known if pid in table and table[pid][2] == start and table[pid][1] != "Z"}


def environment(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


def wait_for(condition, seconds: float, what: str, proc: subprocess.Popen, log: Path):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if proc.poll() is not None:
            pytest.fail(f"the job ended (code {proc.returncode}) before {what}:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)
    pytest.fail(f"no {what} after {seconds} s:\n{log.read_text()[-3000:]}")


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_killed_process_ends_the_job_with_a_message_and_leaves_the_checkpoint_intact(tmp_path):
    run, out, err = tmp_path / "run", tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYROVAE_DIST_TIMEOUT="30")  # a wait in a collective ends after 30 s
    command = [sys.executable, "-m", "pyrovae", "train", "--nproc", "2", "--epochs", "1000", "--out", str(run), *SMALL]
    with open(out, "w") as stdout, open(err, "w") as stderr:
        proc = subprocess.Popen(command, env=env, stdout=stdout, stderr=stderr, cwd=tmp_path, start_new_session=True)
    job = set()  # (pid, start time) of every process of the job seen: torchrun puts each worker in its own session

    def workers():
        found = descendants(proc.pid)
        job.update(found)
        ranks = {environment(pid).get("RANK"): pid for pid, _ in found}
        return ranks if {"0", "1"} <= ranks.keys() else None

    try:
        metrics = run / "metrics.jsonl"
        # epoch 0 is written before training, epoch 1 after the first epoch of steps in both processes
        wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 2, 300,
                 "trained epoch in metrics.jsonl", proc, err)
        killed = wait_for(workers, 30, "processes of ranks 0 and 1", proc, err)["1"]
        os.kill(killed, signal.SIGKILL)

        try:
            code = proc.wait(timeout=HANG_GUARD)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the job still runs {HANG_GUARD} s after rank 1 was killed:\n{err.read_text()[-3000:]}")
        text = err.read_text()
        assert code != 0, text[-3000:]
        # pyrovae's own summary, last, in one line; before it torchrun's report names the killed process
        assert text.rstrip().splitlines()[-1].startswith("pyrovae train: error: training in 2 processes failed"), text[-3000:]
        assert "SIGKILL" in text and re.search(rf"\b{killed}\b", text), text[-3000:]
        # nothing of the job is left running: torchrun stopped rank 0 before it exited
        deadline = time.monotonic() + 10
        while alive(job) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not alive(job), alive(job)
    finally:
        job.update(descendants(proc.pid))
        for pid, _ in alive(job):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    # the run folder: the last checkpoint loads, every metrics line is whole, no temporary left
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    assert state["epoch"] >= 1
    history = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [m["epoch"] for m in history] == list(range(len(history)))
    assert state["epoch"] in (history[-1]["epoch"], history[-1]["epoch"] - 1)
    assert not list(run.glob(".*.tmp")), list(run.iterdir())
