"""Several processes on torch.distributed: data-parallel training and sharded evaluation.

Launched by ``torchrun`` (or ``pyrovae train --nproc N``, which runs it), each process reads its
rank and the world size W from the environment torchrun sets. ``gloo`` on CPU, ``nccl`` on GPUs,
every collective with a timeout so that a process that dies takes the job down with a message
instead of a hang.

Training: every process serves the same global minibatches (the same order and binarization
stream as one process would) and takes every W-th row of each (:class:`ShardedBatches`). After
the backward pass one ``all_reduce`` sums, over processes, the loss, a stop flag and the gradient of every trained parameter — module parameters and ``pyro.param`` ones
alike, which is why this is not ``DistributedDataParallel``, whose reducer sees only a module's own
parameters. The ELBO is a sum over data points, so the summed gradient is exactly the gradient of
the whole global batch: ``--batch-size`` stays the global batch, the learning rate keeps its
meaning, and the result is the training of one process with that batch, up to the order of float
additions and the draws of z (each process draws its own). Rank 0 alone writes the run folder.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import os

import torch
import torch.distributed as dist

TIMEOUT = datetime.timedelta(seconds=float(os.environ.get("PYROVAE_DIST_TIMEOUT", 300)))


def world() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment; (0, 1) for one process."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def is_main() -> bool:
    return world()[0] == 0


@contextlib.contextmanager
def process_group(device: torch.device):
    """Join torchrun's process group for the duration (nothing to do for one process)."""
    rank, size = world()
    if size == 1 or dist.is_initialized():
        yield
        return
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT)
    try:
        yield
    finally:
        dist.destroy_process_group()


def local_device(device: torch.device) -> torch.device:
    """This process's GPU under torchrun (``cuda`` → ``cuda:LOCAL_RANK``)."""
    if device.type == "cuda" and device.index is None and world()[1] > 1:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return device


class ShardedBatches:
    """Every ``size``-th row, from ``rank`` on, of each global batch of ``batches``.

    Yields (idx of the whole global batch, this process's rows): the data points counted in the
    metrics are the global batch's. The state (order, position, random streams) is the global one,
    so a checkpoint resumes with any number of processes.
    """

    def __init__(self, batches, rank: int, size: int):
        self.batches, self.rank, self.size = batches, rank, size

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        for idx, x in self.batches:
            yield idx, x[self.rank :: self.size]

    def peek(self, n: int = 8) -> torch.Tensor:
        return self.batches.peek(n)

    def state_dict(self) -> dict:
        return self.batches.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.batches.load_state_dict(state)


def sum_over_processes(loss: torch.Tensor, stop: bool, params: list[torch.Tensor]) -> tuple[float, bool]:
    """One all_reduce of (loss, stop flag, every gradient): returns the summed loss and whether any
    process asked to stop; the parameters' ``.grad`` become the sums."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    head = torch.stack([loss.detach().to(torch.float64).reshape(()),
                        torch.tensor(float(stop), dtype=torch.float64, device=loss.device)])
    flat = torch.cat([head, *(g.reshape(-1).to(torch.float64) for g in grads)])  # summed in float64
    dist.all_reduce(flat)
    offset = 2
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset : offset + n].view_as(g).to(g.dtype)
        offset += n
    total, stops = flat[:2].tolist()
    return total, stops > 0


def gather(obj) -> list | None:
    """Every process's ``obj`` (picklable), in rank order, on rank 0; None on the others."""
    parts = [None] * world()[1]
    dist.gather_object(obj, parts if is_main() else None, dst=0)
    return parts if is_main() else None


def all_gather(obj) -> list:
    """Every process's ``obj`` (picklable), in rank order, on every process."""
    parts = [None] * world()[1]
    dist.all_gather_object(parts, obj)
    return parts


def rank_seed(rank: int) -> int:
    """A seed for this process's own draws of z, derived from the current torch state and the rank."""
    digest = hashlib.sha256(torch.get_rng_state().numpy().tobytes() + rank.to_bytes(4, "little")).digest()
    return int.from_bytes(digest[:8], "little") >> 1
