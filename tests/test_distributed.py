"""Several processes on torch.distributed (gloo, loopback): the summed gradient and loss are the
combined batch's, the stop flag reaches every process, each process draws from its own seed, a
sharded evaluation is the single-process one, and runs resume with any number of processes."""

import json
import os
import socket
import subprocess
import sys

import pyro
import pyro.distributions as dist
import pytest
import torch
import torch.distributed
import torch.multiprocessing as mp
from pyro.distributions import constraints
from torch import nn

from pyrovae import distributed, params
from pyrovae.context import fast_context
from pyrovae.data import Batches
from pyrovae.train import elbo_loss, train_step

P, D, B = 6, 2, 8
WORLD = 2


class DeltaVAE(nn.Module):
    """A VAE whose guide is a point mass (no noise), with a bare constrained pyro.param: its
    gradients are deterministic, so processes and a single one can be compared exactly."""

    def __init__(self):
        super().__init__()
        self.decoder, self.encoder = nn.Linear(D, P), nn.Linear(P, D)

    def model(self, x):
        pyro.module("decoder", self.decoder)
        scale = pyro.param("scale", lambda: torch.ones(()), constraint=constraints.positive)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(D), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(self.decoder(z), scale).to_event(1), obs=x)

    def guide(self, x):
        pyro.module("encoder", self.encoder)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Delta(self.encoder(x)).to_event(1))


def data() -> torch.Tensor:
    return torch.randn(B, P, generator=torch.Generator().manual_seed(0))


def one_step(shard=None, sync=None) -> tuple[float, dict[str, torch.Tensor]]:
    """The loss and gradient of one step on the global batch, or, with ``shard(batches)``, on this
    process's rows of it; ``sync(loss, stop, params) -> (total, stop)`` as
    :func:`pyrovae.distributed.sum_over_processes` between the backward pass and the checks."""
    torch.manual_seed(0)
    pyro.clear_param_store()
    model = DeltaVAE()
    batches = Batches(data(), B, shuffle=False)
    trained = params.trainable(model.model, model.guide, data())
    if shard is not None:
        batches = shard(batches)
    step_sync = None if sync is None else lambda loss: sync(loss, False, list(trained.values()))[0]
    optimizer = torch.optim.SGD(trained.values(), lr=0.0)
    (_, x), = list(batches)
    with fast_context():
        loss = train_step(elbo_loss(model.model, model.guide), optimizer, x, sync=step_sync)
    return loss, {name: p.grad.clone() for name, p in trained.items()}


# ---------------------------------------------------------------- the variants the checks must tell apart


def not_summed(loss, stop, params):
    """Broken: no collective, each process keeps its own half-batch loss, gradient and stop flag."""
    return loss.item(), stop


def averaged(loss, stop, params):
    """Broken: the mean over processes (as DistributedDataParallel does) instead of the sum."""
    total, stop_any = distributed.sum_over_processes(loss, stop, params)
    size = torch.distributed.get_world_size()
    for p in params:
        p.grad = p.grad / size
    return total / size, stop_any


def own_stop(loss, stop, params):
    """Broken: the sums are right but each process decides on its own stop flag only."""
    return distributed.sum_over_processes(loss, stop, params)[0], stop


def first_rows(batches, rank, size):
    """Broken: every process takes rank 0's rows."""
    return distributed.ShardedBatches(batches, 0, size)


def one_seed(rank):
    """Broken: every process seeded alike, so that all draw the same z."""
    return distributed.rank_seed(0)


# name → (sync, sharding, per-rank seed, a problem it must be reported for)
VARIANTS = {
    "correct": (distributed.sum_over_processes, distributed.ShardedBatches, distributed.rank_seed, None),
    "gradients-not-summed": (not_summed, distributed.ShardedBatches, distributed.rank_seed, "not the combined batch's gradient"),
    "gradients-averaged": (averaged, distributed.ShardedBatches, distributed.rank_seed, "not the combined batch's gradient"),
    "stop-flag-not-shared": (own_stop, distributed.ShardedBatches, distributed.rank_seed, "stop flag"),
    "shards-overlap": (distributed.sum_over_processes, first_rows, distributed.rank_seed, "do not partition"),
    "one-seed-for-every-rank": (distributed.sum_over_processes, distributed.ShardedBatches, one_seed, "same seed"),
}


def run_variant(name: str, rank: int, size: int) -> dict:
    """Everything one process of ``size`` finds for a variant (each process runs the same calls)."""
    sync, shard, seed_of, _ = VARIANTS[name]
    summed_loss, summed = one_step(lambda b: shard(b, rank, size), sync)
    half_loss, half = one_step(lambda b: shard(b, rank, size))
    flags = [torch.zeros(3, requires_grad=True)]
    flags[0].grad = torch.ones(3)
    stops = {asked: sync(torch.zeros(()), rank in asked, flags)[1] for asked in ((), (1,), (0, 1))}
    torch.manual_seed(0)
    seed = seed_of(rank)
    torch.manual_seed(seed)
    draw = torch.randn(4)
    torch.manual_seed(0)
    again = seed_of(rank)
    torch.manual_seed(1)
    other_state = seed_of(rank)
    return {"summed_loss": summed_loss, "summed": summed, "half_loss": half_loss, "half": half, "stops": stops,
            "seed": seed, "again": again, "other_state": other_state, "draw": draw}


def worker(rank: int, size: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=size)
    try:
        torch.save({name: run_variant(name, rank, size) for name in VARIANTS}, f"{out}.{rank}")
    finally:
        torch.distributed.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> dict[str, list[dict]]:
    """Variant → what each of two processes found (one spawn for all the variants)."""
    out = tmp_path_factory.mktemp("dist") / "found"
    mp.spawn(worker, args=(WORLD, free_port(), str(out)), nprocs=WORLD, join=True)
    found = [torch.load(f"{out}.{rank}", weights_only=True) for rank in range(WORLD)]
    return {name: [f[name] for f in found] for name in VARIANTS}


def close(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.allclose(a[n], b[n], rtol=1e-5, atol=1e-6) for n in a)


def problems(ranks: list[dict], one_loss: float, one: dict[str, torch.Tensor]) -> list[str]:
    """What is wrong with the processes' findings, given one process's loss and gradient on the whole batch."""
    found = []
    for rank, r in enumerate(ranks):
        if not close(r["summed"], one):
            found.append(f"rank {rank}: the summed gradient is not the combined batch's gradient")
        if abs(r["summed_loss"] - one_loss) > 1e-5 * abs(one_loss):
            found.append(f"rank {rank}: the summed loss {r['summed_loss']} is not the combined batch's {one_loss}")
        if max((r["summed"][n] - r["half"][n]).abs().max().item() for n in one) < 1e-3:
            found.append(f"rank {rank}: the sync left this process's own half-batch gradient as it was")
        if r["stops"] != {(): False, (1,): True, (0, 1): True}:
            found.append(f"rank {rank}: the stop flag of one process did not stop every one: {r['stops']}")
        if r["again"] != r["seed"] or r["other_state"] == r["seed"]:
            found.append(f"rank {rank}: the seed is not a function of the torch state and the rank")
    halves = {n: sum(r["half"][n] for r in ranks) for n in one}
    if not close(halves, one) or abs(sum(r["half_loss"] for r in ranks) - one_loss) > 1e-5 * abs(one_loss):
        found.append("the processes' rows do not partition the batch: their own gradients do not add up to it")
    if len({r["seed"] for r in ranks}) < len(ranks) or torch.allclose(ranks[0]["draw"], ranks[1]["draw"]):
        found.append("two processes got the same seed and draw the same z")
    return found


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_the_summed_gradient_of_two_processes_is_the_combined_batchs(two_processes, variant):
    """Each process's rows are every other row of the global batch; after the sync every process
    holds the combined batch's loss and gradient (each process's own half alone differs, and the
    halves add up to it), a stop asked by one process stops all, and each process has its own seed.
    Each broken variant is reported for what it breaks."""
    one_loss, one = one_step()
    assert set(one) == {"decoder$$$weight", "decoder$$$bias", "encoder$$$weight", "encoder$$$bias", "scale"}
    found = problems(two_processes[variant], one_loss, one)
    expected = VARIANTS[variant][3]
    if expected is None:
        assert found == []
    else:
        assert any(expected in p for p in found), found


def pyrovae(*argv, nproc: int = 1, cwd=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    prefix = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m", "pyrovae"] \
        if nproc > 1 else [sys.executable, "-m", "pyrovae"]
    done = subprocess.run([*prefix, *map(str, argv)], env=env, capture_output=True, text=True, cwd=cwd, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


SMALL = ["--hidden", "16", "--latent-dim", "2", "--no-progress"]


@pytest.mark.slow
def test_a_run_trains_on_two_processes_resumes_on_one_and_again_on_two_and_evaluates_the_same(tmp_path):
    run = tmp_path / "run"
    pyrovae("train", "--epochs", "1", "--out", run, *SMALL, nproc=2)
    out = pyrovae("train", "--resume", "--epochs", "2", "--out", run, "--no-progress").stdout
    assert "resuming" in out and "after epoch 1 of 2" in out
    out = pyrovae("train", "--resume", "--epochs", "3", "--out", run, "--no-progress", nproc=2).stdout
    assert "after epoch 2 of 3 in 2 processes" in out
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in history] == [0, 1, 2, 3]
    assert history[3]["train_elbo"] > history[1]["train_elbo"]

    evaluate = ["evaluate", run, "-k", "50", "--particles-elbo", "5", "--batch-size", "7", "--seed", "3"]
    pyrovae(*evaluate, "--json", tmp_path / "one.json")
    two = pyrovae(*evaluate, "--json", tmp_path / "two.json", nproc=2)
    assert "359 points" in two.stdout and "2 processes" in two.stdout
    one, two = (json.loads((tmp_path / f"{n}.json").read_text())["per_point"] for n in ("one", "two"))
    assert one.keys() == two.keys()
    for key in one:
        assert one[key] == two[key], key


@pytest.mark.slow
def test_evaluation_with_points_or_particle_chunks_shared_among_two_processes_is_the_single_process_one(tmp_path):
    run = tmp_path / "run"
    pyrovae("train", "--epochs", "2", "--out", run, *SMALL)
    evaluate = ["evaluate", run, "-k", "40", "--chunk-size", "10", "--particles-elbo", "5", "--batch-size", "16",
                "--limit", "60", "--seed", "5", "--ais", "--ais-steps", "4", "--ais-chains", "3", "--ais-leapfrog", "2",
                "--ais-batch-size", "8"]
    pyrovae(*evaluate, "--json", tmp_path / "one.json")
    pyrovae(*evaluate, "--json", tmp_path / "points.json", nproc=2)
    pyrovae(*evaluate, "--shard-particles", "--json", tmp_path / "chunks.json", nproc=2)
    one, points, chunks = (json.loads((tmp_path / f"{n}.json").read_text())["per_point"] for n in ("one", "points", "chunks"))
    assert any(key.startswith("ais_") for key in one)
    for other in (points, chunks):
        assert other.keys() == one.keys()
        for key in one:
            assert other[key] == one[key], key
    # the check can fail: another chunk size draws other importance samples
    pyrovae(*evaluate[:5], "20", *evaluate[6:], "--json", tmp_path / "other.json")
    other = json.loads((tmp_path / "other.json").read_text())["per_point"]
    assert other["log_px"] != one["log_px"] and other["elbo"] == one["elbo"]
