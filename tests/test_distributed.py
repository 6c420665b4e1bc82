"""Several processes on torch.distributed (gloo, loopback): the summed gradient is the combined
batch's, a sharded evaluation is the single-process one, and runs resume with any number of processes."""

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


def gradients(world: tuple[int, int] | None) -> dict[str, torch.Tensor]:
    """The gradient of one step on the batch, by one process (None) or by this rank of several."""
    torch.manual_seed(0)
    pyro.clear_param_store()
    model = DeltaVAE()
    batches = Batches(data(), B, shuffle=False)
    trained = params.trainable(model.model, model.guide, data())
    sync = None
    if world is not None:
        batches = distributed.ShardedBatches(batches, *world)
        sync = lambda loss: distributed.sum_over_processes(loss, False, list(trained.values()))[0]  # noqa: E731
    optimizer = torch.optim.SGD(trained.values(), lr=0.0)
    (_, x), = list(batches)
    with fast_context():
        train_step(elbo_loss(model.model, model.guide), optimizer, x, sync=sync)
    return {name: p.grad.clone() for name, p in trained.items()}


def worker(rank: int, size: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=size)
    try:
        grads = gradients((rank, size))
        torch.save(grads, f"{out}.{rank}")
    finally:
        torch.distributed.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_summed_gradient_of_two_processes_is_the_combined_batchs(tmp_path):
    expected = gradients(None)
    assert set(expected) == {"decoder$$$weight", "decoder$$$bias", "encoder$$$weight", "encoder$$$bias", "scale"}
    mp.spawn(worker, args=(2, free_port(), str(tmp_path / "grads")), nprocs=2, join=True)
    for rank in (0, 1):
        got = torch.load(tmp_path / f"grads.{rank}", weights_only=True)
        for name in expected:
            torch.testing.assert_close(got[name], expected[name], rtol=1e-6, atol=1e-6)
    # the check can fail: one process's half of the batch alone gives another gradient
    half = {name: g for name, g in torch.load(tmp_path / "grads.0", weights_only=True).items()}
    assert not torch.allclose(half["decoder$$$weight"], 0.5 * expected["decoder$$$weight"])


def pyrovae(*argv, nproc: int = 1, cwd=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    prefix = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m", "pyrovae"] \
        if nproc > 1 else [sys.executable, "-m", "pyrovae"]
    done = subprocess.run([*prefix, *map(str, argv)], env=env, capture_output=True, text=True, cwd=cwd, timeout=600)
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
