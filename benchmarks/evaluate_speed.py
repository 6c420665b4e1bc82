"""Speed of importance-sampled log p(x) on MNIST: pyrovae against hand-written PyTorch, Pyro and pythae.

Every method estimates, for each test point x, log p(x) ≈ logsumexp_k log w_k − log K with
log w_k = log p(x | z_k) + log p(z_k) − log q(z_k | x), z_k ~ q(z | x), K draws per point
(default K = 5000, Burda et al. 2016's protocol), on the same trained weights, every method on the
device ``--device`` names (cpu, the default, or cuda; weights and test points are moved there):

    (a) pyrovae   pyrovae.evaluate.evaluate(model, guide, x, K, iwae_ks=(), particles_elbo=1, ...): the whole call,
                  PSIS k̂ and the other per-point estimators included; evaluate's defaults for the
                  device (its batch size for the device and K; compile="auto", decided once for a
                  timing block) unless --batch-size/--chunk-size/--compile are given
    (b) pytorch   hand-written eager PyTorch: encoder → (μ, σ), z = μ + σ ε, decoder logits,
                  −BCE-with-logits, Gaussian log-densities by formula, --hand-batch points per pass
                  with all their K draws (default: one point on CPU, where that measured fastest,
                  100 points on CUDA, where one point per pass is launch-bound)
    (c) pyro      pyro.infer.importance.vectorized_importance_weights, one point per call (it sums
                  over the data plate, so one point at a time is how it gives per-point weights)
    (d) pythae    pythae's VAE.get_nll, with an encoder and decoder wrapping the same modules
                  (only when pythae is importable: it lives in a separate benchmark venv, see README.md)

Reported per method: points/s (median over interleaved repeats of the cycle a, b, c, d; on CUDA
the clock is read after torch.cuda.synchronize), the mean log p(x) with its standard error across
points, and the largest per-point |difference| from (b) in combined Monte Carlo standard errors.
Peak memory of (a) is measured in fresh subprocesses at two chunk sizes and two K: on CPU the
kernel's peak resident set during the call (VmHWM, the counter behind ``ru_maxrss``, reset just
before the call), which sees torch's allocations (tracemalloc does not); on CUDA
``torch.cuda.max_memory_allocated`` during the call (its peak statistics reset just before it).
A table is printed and JSON written to results/evaluate_speed.json; both name the device.

Weights: ``--checkpoint RUN`` (a pyrovae run folder), else a 784-200-200-50 tanh VAE trained here for
``--train-epochs`` on dynamically binarized MNIST and cached in results/. Test data: the MNIST test set,
binarized once (``static_binarized``). ``--tiny`` runs a seconds-long version on scikit-learn's digits
(the test suite's smoke test).

Usage: python benchmarks/evaluate_speed.py [--tiny] [--device cpu|cuda] [--points N] [-k K] [--hand-batch N] [--out FILE]

    python benchmarks/evaluate_speed.py --points 100
    python benchmarks/evaluate_speed.py --points 1000 --device cuda
    ../bench-venv/bin/python benchmarks/evaluate_speed.py --points 100     # with pythae
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyro
import torch
import torch.nn.functional as F

import pyrovae
from pyrovae.data import Batches, load_dataset, static_binarized
from pyrovae.diagnostics import KHAT_THRESHOLD
from pyrovae.evaluate import compile_pays, default_batch_size, evaluate
from pyrovae.models import VAEConfig, build_model, build_vae
from pyrovae.train import TrainConfig, fit

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
DEFAULT_DATA_DIR = HERE.parent.parent / "shared" / "data"  # ../shared/data beside the checkout
LABELS = {
    "pyrovae": "(a) pyrovae evaluate",
    "pytorch": "(b) hand-written PyTorch",
    "pyro": "(c) Pyro vectorized_importance_weights",
    "pythae": "(d) pythae VAE.get_nll",
}
MEMORY_RUNS = [(1000, 500), (5000, 500), (1000, 5000), (5000, 5000)]  # (K, chunk size)
HAND_BATCH = {"cpu": 1, "cuda": 100}  # (b)'s default points per pass, by device
MEMORY_POINTS = {"cpu": 2, "cuda": 100}  # default points per peak-memory run, by device


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--points", type=int, default=100, help="evaluate the first N test points (default: %(default)s)")
    p.add_argument("-k", "--samples", type=int, default=5000, help="importance samples K per point (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved timing repeats over the methods, median reported (default: %(default)s)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of training, of the test set's binarization (seed + 1) and of the draws (default: %(default)s)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="where every method runs: the weights and test points are moved there (default: %(default)s)")
    g = p.add_argument_group("(a) pyrovae's evaluate options (unset: evaluate's defaults for the device)")
    g.add_argument("--batch-size", type=int, help="points per pass (default: pyrovae.evaluate.default_batch_size for the device and K)")
    g.add_argument("--chunk-size", type=int, help="particles per pass")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="evaluate's compiled path, where this pyrovae's evaluate has a compile option (default: \"auto\", "
                        "as pyrovae's evaluate command: compiled only where it pays, never on CUDA)")
    g = p.add_argument_group("other methods")
    g.add_argument("--block", type=int, default=10,
                   help="points per interleaved timing block, rounded up to a multiple of (a)'s and (b)'s points per pass "
                        "and at most --points (default: %(default)s)")
    g.add_argument("--hand-batch", type=int,
                   help="(b): points per pass, each with all its K draws (default: 1 on CPU, one point with all K draws per "
                        "pass, which measured fastest there; 100 on CUDA, where one point per pass is launch-bound)")
    g.add_argument("--hand-chunk", type=int, help="(b): particles per pass (default: all K at once)")
    g.add_argument("--pythae-batch-size", type=int, help="(d): get_nll's batch_size, samples per pass (default: K, its best setting)")
    g.add_argument("--no-pythae", action="store_true", help="skip (d) even if pythae is importable")
    g.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    g.add_argument("--memory-points", type=int,
                   help="points per peak-memory run (default: 2 on CPU; 100 on CUDA, one default pass of evaluate at K = 5000)")
    g = p.add_argument_group("weights and data")
    g.add_argument("--checkpoint", type=Path, metavar="RUN", help="a pyrovae run folder to take the weights and test data from")
    g.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR if DEFAULT_DATA_DIR.is_dir() else None,
                   help="folder with the MNIST IDX files (default: ../shared/data beside the checkout, else $PYROVAE_DATA)")
    g.add_argument("--train-epochs", type=int, default=2, help="epochs of the VAE trained (and cached in results/) without --checkpoint (default: %(default)s)")
    p.add_argument("--tiny", action="store_true", help="seconds-long smoke run: digits, small net, K=50, 4 points, 1 repeat, no memory runs, no pythae")
    p.add_argument("--out", type=Path, help="JSON output (default: results/evaluate_speed.json, results/evaluate_speed_tiny.json with --tiny)")
    p.add_argument("--memory-probe", type=Path, help=argparse.SUPPRESS)  # internal: one peak-memory run
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available here")
    if args.tiny:
        args.samples, args.points, args.repeats, args.block = 50, 4, 1, 2
        args.no_memory = args.no_pythae = True
    if args.out is None:
        args.out = RESULTS / ("evaluate_speed_tiny.json" if args.tiny else "evaluate_speed.json")
    args.hand_chunk = args.hand_chunk or args.samples
    args.hand_batch = HAND_BATCH[args.device] if args.hand_batch is None else args.hand_batch
    args.pythae_batch_size = args.pythae_batch_size or args.samples
    args.memory_points = MEMORY_POINTS[args.device] if args.memory_points is None else args.memory_points
    for name in ("points", "samples", "repeats", "threads", "block", "hand_batch", "hand_chunk", "pythae_batch_size", "memory_points"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


# --- weights and data ---------------------------------------------------------------------------


def load_setup(args) -> tuple[torch.nn.Module, torch.Tensor, dict]:
    """The trained VAE (eval mode), the test points x (N, P) and a description of both, on the CPU
    (``_benchmark`` moves them to ``--device``)."""
    if args.tiny:
        return _tiny_setup(args)
    if args.checkpoint is not None:
        from pyrovae.run import Run

        run = Run.open(args.checkpoint)
        data, vae, _ = run.load_model("cpu")  # rebuilt and loaded from the run's last checkpoint
        vae.eval()
        split = run.eval_split(data)
        x = split[: args.points]
        _check_plain_vae(vae)
        return vae, x, {"weights": f"run folder {args.checkpoint}", "model": run.config["model"], "data": run.config["data"],
                        "split_points": len(split)}
    data = load_dataset("mnist", args.data_dir)
    config = VAEConfig(data.dim, latent_dim=50, hidden=(200, 200), activation="tanh")
    cache = RESULTS / f"vae-mnist-784-200x200-50-tanh-{args.train_epochs}ep-seed{args.seed}.pt"
    vae = build_vae(config)
    if cache.is_file():
        state = torch.load(cache, weights_only=True)
        vae.load_state_dict(state["model"])
        history = state["history"]
        print(f"weights: {cache.relative_to(HERE.parent)} (cached)")
    else:
        print(f"training a 784-200-200-50 tanh VAE for {args.train_epochs} epochs on dynamically binarized MNIST ...", flush=True)
        torch.manual_seed(args.seed)
        batches = Batches(data.train, 128, "dynamic", seed=args.seed)
        history = fit(vae, batches, TrainConfig(epochs=args.train_epochs, batch_size=128, seed=args.seed), progress=False)
        RESULTS.mkdir(parents=True, exist_ok=True)
        torch.save({"config": config.to_dict(), "model": vae.state_dict(), "history": history}, cache)
        print(f"weights: trained, train ELBO {history[-1]['train_elbo']:.2f} nats; cached in {cache.relative_to(HERE.parent)}")
    x = static_binarized(data.test, args.seed + 1)[: args.points]
    description = {
        "weights": f"trained here: {args.train_epochs} epochs, Adam 1e-3, batch 128, dynamically binarized MNIST (cache {cache.name})",
        "train_elbo_last_epoch": history[-1]["train_elbo"],
        "model": config.to_dict(),
        "data": {"dataset": "mnist", "split": "test", "binarize": "static", "seed": args.seed + 1},
        "split_points": len(data.test),
    }
    return vae.eval(), x, description


def _tiny_setup(args):
    torch.manual_seed(args.seed)
    data = load_dataset("digits")
    config = VAEConfig(data.dim, latent_dim=4, hidden=(32,), activation="tanh")
    vae = build_vae(config)
    fit(vae, Batches(data.train, 64, "dynamic", seed=args.seed), TrainConfig(epochs=5, batch_size=64, seed=args.seed), progress=False)
    x = static_binarized(data.test, args.seed + 1)[: args.points]
    return vae.eval(), x, {"weights": "tiny: trained here, 5 epochs on digits", "model": config.to_dict(),
                           "data": {"dataset": "digits", "split": "test", "binarize": "static", "seed": args.seed + 1},
                           "split_points": len(data.test)}


def _check_plain_vae(vae) -> None:
    """(b) and (d) write the densities by hand: they need the textbook VAE."""
    from pyrovae.models import Bernoulli, StandardNormal

    if not (hasattr(vae, "encoder") and hasattr(vae.encoder, "loc_scale") and isinstance(vae.likelihood, Bernoulli)
            and isinstance(vae.prior, StandardNormal)):
        sys.exit("this benchmark needs a VAE with a diagonal Gaussian encoder, a N(0, I) prior and a Bernoulli likelihood")


# --- the methods: each maps (vae, x (N, P), K) to per-point log p(x) and its standard error, both (N,) -----
# (pyrovae's evaluate also gives each point's PSIS k̂, kept to say which points' standard errors can be trusted)


def log_px_per_point(log_w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per column of log_w (K, B): log (1/K) Σ_k w_k and its delta-method standard error sd(w)/(√K mean w), both (B,) double."""
    log_w = log_w.double()
    K = log_w.shape[0]
    value = torch.logsumexp(log_w, 0) - math.log(K)
    stderr = torch.exp(log_w - value).std(0) / math.sqrt(K) if K > 1 else torch.full_like(value, math.nan)
    return value, stderr


def log_px_from_log_w(log_w: torch.Tensor) -> tuple[float, float]:
    """log (1/K) Σ w_k and its delta-method standard error, from one point's log_w (K,)."""
    value, stderr = log_px_per_point(log_w.reshape(-1, 1))
    return value.item(), stderr.item()


def run_pyrovae(vae, x, K, args) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    kwargs = {"num_samples": K, "iwae_ks": (), "particles_elbo": 1}
    if args.batch_size is not None:
        kwargs["batch_size"] = args.batch_size
    if args.chunk_size is not None:
        kwargs["chunk_size"] = args.chunk_size
    if getattr(args, "evaluate_compile", None) is not None:  # set by _measure: --compile/--no-compile, or "auto" resolved
        kwargs["compile"] = args.evaluate_compile
    result = evaluate(vae.model, vae.guide, x, **kwargs)
    return result.log_px.value, result.log_px.stderr, result.khat


def run_pytorch(vae, x, K, args) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain eager PyTorch on the VAE's own encoder and decoder, called as torch modules outside any Pyro handler:
    ``--hand-batch`` points per pass, each with all its K draws, ``--hand-chunk`` draws at a time."""
    values, stderrs = [], []
    for first in range(0, len(x), args.hand_batch):
        xb = x[first : first + args.hand_batch]  # (B, P)
        loc, scale = vae.encoder.loc_scale(xb)  # (B, D), (B, D)
        log_scale = scale.log().sum(-1)  # (B,)
        log_w = []
        for start in range(0, K, args.hand_chunk):
            eps = torch.randn(min(args.hand_chunk, K - start), *loc.shape, device=loc.device)  # (C, B, D)
            z = loc + scale * eps
            logits = vae.decoder(z)  # (C, B, P)
            log_px_z = -F.binary_cross_entropy_with_logits(logits, xb.expand_as(logits), reduction="none").sum(-1)  # (C, B)
            # log N(z; 0, I) − log N(z; μ, σ²): the −D/2 log 2π terms cancel; (z − μ)/σ = ε
            log_w.append(log_px_z - 0.5 * (z * z).sum(-1) + 0.5 * (eps * eps).sum(-1) + log_scale)
        value, stderr = log_px_per_point(torch.cat(log_w))  # (B,), (B,)
        values.append(value)
        stderrs.append(stderr)
    return torch.cat(values).cpu(), torch.cat(stderrs).cpu()


def decoder_matmuls(vae, x, K, args) -> None:
    """The decoder's matrix products alone, as (a) and (b) do them for K draws of each point, one
    point per pass (``torch.addmm`` per linear layer, no activation, no density): the bound of any
    exact method on this network, its arithmetic being nearly all in these products."""
    layers = [m for m in vae.decoder.modules() if isinstance(m, torch.nn.Linear)]
    z = torch.randn(K, layers[0].in_features, device=x.device)
    for _ in range(len(x)):
        h = z
        for layer in layers:
            h = torch.addmm(layer.bias, h, layer.weight.t())
    return None


def run_pyro(vae, x, K, args) -> tuple[torch.Tensor, torch.Tensor]:
    """Pyro's vectorized importance weights, one point per call, validation off as in pyrovae's evaluate."""
    from pyro.infer.importance import vectorized_importance_weights

    values, stderrs = [], []
    with pyro.validation_enabled(False):
        for n in range(len(x)):
            log_w, _, _ = vectorized_importance_weights(vae.model, vae.guide, x[n : n + 1], num_samples=K, max_plate_nesting=1)
            value, stderr = log_px_from_log_w(log_w)  # log_w: (K,)
            values.append(value)
            stderrs.append(stderr)
    return torch.tensor(values, dtype=torch.float64), torch.tensor(stderrs, dtype=torch.float64)


def make_pythae(vae):
    """A pythae VAE whose encoder and decoder wrap the trained modules, or None if pythae is not importable.

    pythae's encoder returns μ and log σ² (``log_covariance``); its "bce" loss reads probabilities,
    so the decoder returns sigmoid(logits). Both count the rows they see, to show what get_nll computes.
    """
    try:
        from pythae.models import VAE, VAEConfig as PythaeConfig
        from pythae.models.base.base_utils import ModelOutput
        from pythae.models.nn import BaseDecoder, BaseEncoder
    except ImportError:
        return None

    class Encoder(BaseEncoder):
        def __init__(self):
            super().__init__()
            self.net, self.rows, self.last = vae.encoder, 0, None

        def forward(self, x):
            self.rows += x.shape[0]
            loc, scale = self.net.loc_scale(x.reshape(x.shape[0], -1))
            self.last = (x, loc, 2 * scale.log())
            return ModelOutput(embedding=loc, log_covariance=self.last[2])

    class Decoder(BaseDecoder):
        def __init__(self, encoder):
            super().__init__()
            self.net, self.rows, self.encoder, self.record = vae.decoder, 0, [encoder], None

        def forward(self, z):
            self.rows += z.shape[0]
            probs = torch.sigmoid(self.net(z))
            if self.record is not None:  # get_nll's log-weights, by its own formulas
                x, mu, log_var = self.encoder[0].last
                log_q = -0.5 * (log_var + (z - mu) ** 2 / log_var.exp()).sum(-1)
                log_p_z = -0.5 * (z**2).sum(-1)
                log_p_x_z = -F.binary_cross_entropy(probs, x.reshape(probs.shape), reduction="none").sum(-1)
                self.record.append(log_p_x_z + log_p_z - log_q)
            return ModelOutput(reconstruction=probs)

    latent_dim = vae.encoder.latent_dim
    data_dim = vae.decoder[-1].out_features
    config = PythaeConfig(input_dim=(data_dim,), latent_dim=latent_dim, reconstruction_loss="bce")
    encoder = Encoder()
    return VAE(config, encoder=encoder, decoder=Decoder(encoder)).eval()


def run_pythae(model, x, K, args) -> tuple[torch.Tensor, None]:
    """pythae's get_nll on one point per call: it loops over points itself and returns only their mean,
    which for one point is that point's log p(x) (a log-likelihood, despite the name). No standard error."""
    values = [model.get_nll(x[n : n + 1], n_samples=K, batch_size=args.pythae_batch_size) for n in range(len(x))]
    return torch.tensor(values, dtype=torch.float64), None


def pythae_with_stderr(model, x, K, args) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """get_nll per point with its decoder recording the log-weights it draws (by get_nll's own formulas):
    the per-point standard error get_nll does not give, and a check that the recorded weights reproduce its value."""
    values, stderrs, diffs, counts = [], [], [], []
    for n in range(len(x)):
        model.decoder.record = []
        value = model.get_nll(x[n : n + 1], n_samples=K, batch_size=args.pythae_batch_size)
        log_w = torch.cat(model.decoder.record)
        model.decoder.record = None
        recorded, stderr = log_px_from_log_w(log_w)
        values.append(value)
        stderrs.append(stderr)
        diffs.append(abs(recorded - value))
        counts.append(log_w.numel())
    check = {"max_abs_diff_recorded_vs_get_nll": max(diffs), "samples_per_point": sorted(set(counts))}
    return torch.tensor(values, dtype=torch.float64), torch.tensor(stderrs, dtype=torch.float64), check


def pyrovae_batch_size(args) -> int:
    """(a)'s points per pass: ``--batch-size``, else evaluate's default for the device and K."""
    captured = "capture" in inspect.signature(evaluate).parameters  # evaluate's default: the captured pass
    return args.batch_size or default_batch_size(args.samples, args.device, captured)


def _block_size(args, N: int) -> int:
    """Points per interleaved block: ``--block``, rounded up to a multiple of (a)'s and (b)'s points per
    pass (so that neither runs smaller passes than it is set to), and at most N."""
    batch = math.lcm(pyrovae_batch_size(args), args.hand_batch)
    return min(-(-args.block // batch) * batch, N)


# --- peak memory in a fresh process -------------------------------------------------------------


def memory_probe(path: Path) -> None:
    """Child process: evaluate the saved points once; print the memory before and the peak during the call (MiB) as JSON.

    On CPU the peak is the kernel's high-water mark of the resident set (VmHWM in /proc/self/status), reset to
    the current RSS just before the call (``echo 5 > /proc/self/clear_refs``, Linux), so the first call's
    costs (lazy imports, any compilation) do not hide it. ``ru_maxrss`` is the same counter but also keeps
    the peak seen when any thread exited, so it cannot be reset; it is printed as the lifetime peak.
    On CUDA the peak is ``torch.cuda.max_memory_allocated`` (tensors the caching allocator handed out),
    its statistics reset just before the call; ``max_memory_reserved`` (what the allocator held) beside it.
    """
    import resource

    job = torch.load(path, weights_only=True)
    device = job.get("device", "cpu")
    torch.set_num_threads(job["threads"])
    if job.get("checkpoint"):  # a run folder's model: rebuilt as the run records it (its config is not a VAEConfig)
        from pyrovae.run import Run

        _, vae, _ = Run.open(job["checkpoint"]).load_model("cpu")
    else:
        vae = build_model(job["config"])
    vae.load_state_dict(job["model"])
    vae.to(device).eval()
    x = job["x"].to(device)
    kwargs = {"iwae_ks": (), "particles_elbo": 1, "batch_size": job["batch_size"]}
    if job["compile"] is not None:
        kwargs["compile"] = job["compile"]
    with torch.no_grad():
        chunk = min(job["K"], job["chunk"])  # warm-up on the measured call's chunk shape: lazy imports (arviz), compilation
        evaluate(vae.model, vae.guide, x[:1], num_samples=chunk, chunk_size=chunk, **kwargs)
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            evaluate(vae.model, vae.guide, x, num_samples=job["K"], chunk_size=job["chunk"], **kwargs)
            torch.cuda.synchronize()
            print(json.dumps({"device": device, "allocated_before_mib": before / 2**20, "peak_mib": torch.cuda.max_memory_allocated() / 2**20,
                              "max_reserved_mib": torch.cuda.max_memory_reserved() / 2**20}))
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
            reset = True
        except OSError:
            reset = False
        rss_before = _proc_status_kib("VmRSS")
        evaluate(vae.model, vae.guide, x, num_samples=job["K"], chunk_size=job["chunk"], **kwargs)
        peak = _proc_status_kib("VmHWM")
    lifetime = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    print(json.dumps({"rss_before_mib": rss_before / 1024, "peak_mib": peak / 1024, "peak_reset": reset,
                      "lifetime_ru_maxrss_mib": lifetime / 1024}))


def _proc_status_kib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return float(line.split()[1])
    return math.nan


def measure_memory(vae, config: dict, x, args, compile_kw) -> list[dict]:
    rows = []
    what = "peak RSS" if args.device == "cpu" else "peak CUDA allocated"
    state = {name: value.cpu() for name, value in vae.state_dict().items()}
    with tempfile.TemporaryDirectory() as tmp:
        for K, chunk in MEMORY_RUNS:
            # points per pass: --batch-size, else one on CPU (as this benchmark always measured), evaluate's default on CUDA
            batch_size = args.batch_size or (1 if args.device == "cpu" else default_batch_size(K, args.device))
            job = Path(tmp) / "job.pt"
            torch.save({"config": config, "model": state, "x": x[: args.memory_points].cpu(), "K": K, "chunk": chunk,
                        "batch_size": batch_size, "threads": args.threads, "compile": compile_kw, "device": args.device,
                        "checkpoint": None if args.checkpoint is None else str(args.checkpoint.resolve())}, job)
            done = subprocess.run([sys.executable, __file__, "--memory-probe", str(job)], capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"memory probe K={K} chunk={chunk} failed:\n{done.stderr[-2000:]}")
            m = json.loads(done.stdout.strip().splitlines()[-1])
            before = m["rss_before_mib"] if args.device == "cpu" else m["allocated_before_mib"]
            rows.append({"K": K, "chunk_size": chunk, "effective_chunk": min(K, chunk), "batch_size": batch_size,
                         "points": len(x[: args.memory_points]), **m, "growth_mib": m["peak_mib"] - before})
            print(f"  memory K={K:>5} chunk={chunk:>5}: {what} {m['peak_mib']:.0f} MiB, "
                  f"{rows[-1]['growth_mib']:.0f} MiB above that before the call", flush=True)
    return rows


# --- the benchmark ------------------------------------------------------------------------------


def machine_info(device: str) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__, "pyro": pyro.__version__, "pyrovae": pyrovae.__version__,
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "cuda": torch.cuda.get_device_name() if device == "cuda" else None}
    if hasattr(os, "getloadavg"):
        info["load_average_at_start"] = os.getloadavg()
    return info


def compile_support(args) -> bool | str | None:
    """The ``compile`` value to pass to evaluate (None: don't pass it): ``--compile/--no-compile``, else
    ``"auto"`` (pyrovae's evaluate command's default: compiled where it pays for the device and size)."""
    supported = "compile" in inspect.signature(evaluate).parameters
    if args.compile is not None and not supported:
        sys.exit("--compile/--no-compile: this pyrovae's evaluate has no compile option")
    return args.compile if args.compile is not None or not supported else "auto"


def summarize(values: torch.Tensor) -> tuple[float, float]:
    """Mean over points and its standard error across points."""
    n = values.numel()
    return values.mean().item(), (values.std().item() / math.sqrt(n) if n > 1 else math.nan)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.memory_probe is not None:
        memory_probe(args.memory_probe)
        return 0
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _benchmark(args)
    finally:
        torch.set_num_threads(threads)


def _benchmark(args) -> int:
    compile_kw = compile_support(args)
    vae, x, setup = load_setup(args)  # may train (on the CPU): outside no_grad
    vae, x = vae.to(args.device), x.to(args.device)  # every method runs on the device
    with torch.no_grad():
        return _measure(args, vae, x, setup, compile_kw)


def _measure(args, vae, x, setup, compile_kw) -> int:
    K, N = args.samples, len(x)
    machine = machine_info(args.device)
    methods = ["pyrovae", "pytorch", "pyro"]
    notes = {}
    pythae_model = None if args.no_pythae else make_pythae(vae)
    if pythae_model is not None:  # get_nll computes on its data's device, with the wrapped modules already there
        pythae_model.to(args.device)
        methods.append("pythae")
    else:
        notes["pythae"] = "skipped: " + ("--no-pythae" if args.no_pythae else
                                         "pythae is not importable from this Python (install benchmarks/requirements-pythae.txt in a separate venv)")
        print(f"(d) pythae {notes['pythae']}")
    block = _block_size(args, N)
    device_name = args.device if machine["cuda"] is None else f"{args.device} ({machine['cuda']})"
    print(f"{N} points, K = {K} importance samples each, {args.repeats} interleaved repeats, on {device_name}, "
          f"{args.threads} torch threads; (a) {min(pyrovae_batch_size(args), block)} and (b) {min(args.hand_batch, block)} "
          f"points per pass, blocks of {block} points", flush=True)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)  # before each clock reading: CUDA runs asynchronously
    # "auto" decided once, as `pyrovae evaluate` decides it for the whole split these points come from (the command a user
    # runs evaluates all of it: on CPU, compiled for the 10 000 MNIST test points at K = 5000, not for the 359 digits), so
    # that a compiling (a) compiles in its warm-up, not in a timed block
    decided_for = setup.get("split_points", N)
    args.evaluate_compile = compile_pays(decided_for, K, args.device) if compile_kw == "auto" else compile_kw

    def call(name: str, points: torch.Tensor):
        if name == "pythae":
            return run_pythae(pythae_model, points, K, args)
        return {"pyrovae": run_pyrovae, "pytorch": run_pytorch, "pyro": run_pyro}[name](vae, points, K, args)

    warmup_s = {}
    for name in methods:  # one point each, untimed in the results: first-call costs (and any compilation)
        torch.manual_seed(args.seed)
        sync()
        start = time.perf_counter()
        call(name, x[:1])
        sync()
        warmup_s[name] = time.perf_counter() - start
        # and one block, untimed: the shapes of a block's passes (their captures and compiles; on CUDA, their kernels
        # and the caching allocator's memory)
        call(name, x[:block])

    # Each repeat runs every method on each block of points in turn, the order rotating from block to
    # block, so that the load of a shared machine falls on all methods alike; per block, each method's
    # time over (b)'s on the same block is a paired ratio.
    seconds = {name: [0.0] * args.repeats for name in methods}
    bound_seconds = [0.0] * args.repeats  # the decoder's matrix products alone, timed beside the methods
    ratios = {name: [] for name in methods}
    parts = {name: [] for name in methods}
    khats = []  # (a)'s PSIS k̂ per point, from its first repeat
    for rep in range(args.repeats):
        for b, start_point in enumerate(range(0, N, block)):
            xb = x[start_point : start_point + block]
            order = methods[b % len(methods):] + methods[: b % len(methods)]
            took = {}
            for name in order:
                torch.manual_seed(args.seed * 10**9 + rep * 10**6 + b * 10 + methods.index(name))  # independent draws per method
                sync()
                start = time.perf_counter()
                values, stderrs, *khat = call(name, xb)
                sync()
                took[name] = time.perf_counter() - start
                seconds[name][rep] += took[name]
                if rep == 0:
                    parts[name].append((values.double(), None if stderrs is None else stderrs.double()))
                    if khat:
                        khats.append(khat[0])
            for name in methods:
                ratios[name].append(took["pytorch"] / took[name])  # speed relative to (b)
            sync()
            start = time.perf_counter()
            decoder_matmuls(vae, xb, K, args)
            sync()
            bound_seconds[rep] += time.perf_counter() - start
        print(f"  repeat {rep + 1}/{args.repeats}: " + ", ".join(f"{name} {N / seconds[name][rep]:.2f}" for name in methods)
              + " points/s", flush=True)
    estimates = {name: (torch.cat([v for v, _ in parts[name]]),
                        None if parts[name][0][1] is None else torch.cat([e for _, e in parts[name]])) for name in methods}
    pythae_check = None
    if pythae_model is not None:  # per-point standard errors for (d): an untimed pass that records its log-weights
        torch.manual_seed(args.seed + 7)
        values, stderrs, pythae_check = pythae_with_stderr(pythae_model, x, K, args)
        estimates["pythae"] = (values, stderrs)

    ref_v, ref_se = estimates["pytorch"]
    khat = torch.cat(khats).double()
    reliable = khat <= KHAT_THRESHOLD  # nan (K < 25) counts as not reliable
    results = {}
    for name in methods:
        values, stderrs = estimates[name]
        mean, se = summarize(values)
        entry = {"label": LABELS[name], "points_per_s": N / statistics.median(seconds[name]), "seconds": seconds[name],
                 "speed_vs_pytorch": statistics.median(ratios[name]),
                 "warmup_seconds_one_point": warmup_s[name], "log_px_mean": mean, "log_px_se_across_points": se,
                 "mean_diff_vs_pytorch": (values - ref_v).mean().item(),
                 "mean_diff_vs_pytorch_se_across_points": summarize(values - ref_v)[1], "per_point_log_px": values.tolist()}
        if stderrs is not None:
            entry["per_point_stderr"] = stderrs.tolist()
            entry["mc_stderr_mean"] = stderrs.mean().item()
        if name != "pytorch":
            z = (values - ref_v) / (stderrs**2 + ref_se**2).sqrt()
            entry["max_abs_z_vs_pytorch"] = z.abs().max().item()
            entry["max_abs_z_vs_pytorch_khat_le_0.7"] = z[reliable].abs().max().item() if reliable.any() else None
            entry["sd_z_vs_pytorch"] = z.std().item() if N > 1 else None  # ≈ 1 when the standard errors are honest
        results[name] = entry
    results["pyrovae"]["options"] = {"batch_size": args.batch_size, "chunk_size": args.chunk_size, "compile": compile_kw,
                                     "points_per_pass": min(pyrovae_batch_size(args), block),  # at most a block per call
                                     "compiled": args.evaluate_compile, "compile_decided_for_points": decided_for,
                                     "captured": "capture" in inspect.signature(evaluate).parameters,
                                     "evaluate_defaults": {k: v.default for k, v in inspect.signature(evaluate).parameters.items()
                                                           if k in ("batch_size", "chunk_size", "compile")}}
    results["pytorch"]["options"] = {"chunk": args.hand_chunk, "hand_batch": args.hand_batch, "points_per_pass": min(args.hand_batch, block)}
    if pythae_model is not None:
        import pythae

        bs = args.pythae_batch_size
        results["pythae"]["options"] = {"batch_size": bs, "n_samples": K}
        results["pythae"]["version"] = getattr(pythae, "__version__", None) or _dist_version("pythae")
        # the warm-up point and block, the timed repeats and the recording pass
        points_seen = 1 + block + (args.repeats + 1) * N
        results["pythae"]["samples_per_point_used"] = pythae_model.decoder.rows / points_seen
        results["pythae"]["encoder_rows_per_point"] = pythae_model.encoder.rows / points_seen
        results["pythae"]["check"] = pythae_check
        results["pythae"]["note"] = (
            "get_nll returns the mean of log p(x) (negative) under the name nll; with n_samples > batch_size it draws "
            "(n_samples // batch_size) * batch_size samples (remainder dropped), otherwise batch_size samples whatever n_samples; "
            "it re-encodes batch_size copies of each point for every pass (encoder rows per point = samples per point); "
            "probabilities through F.binary_cross_entropy (log clamped at -100). It gives no per-point standard error: "
            "the estimates here come from an extra untimed pass whose decoder records the log-weights get_nll draws."
        )

    memory = []
    if not args.no_memory:
        print("peak memory of (a), each in a fresh process (" + ("VmHWM" if args.device == "cpu" else "CUDA peak statistics")
              + " reset before the call):", flush=True)
        memory = measure_memory(vae, setup["model"], x, args, compile_kw)

    if hasattr(os, "getloadavg"):
        machine["load_average_at_end"] = os.getloadavg()
    diagnostics = {"per_point_khat": khat.tolist(), "share_khat_above_0.7": (khat > KHAT_THRESHOLD).double().mean().item(),
                   "note": "PSIS k̂ of each point's weights, from (a)'s first repeat; above 0.7 the delta-method standard "
                           "errors understate the error (heavy-tailed weights), so z-scores there run large."}
    memory_note = ("peak = VmHWM, the kernel's peak resident set (the counter behind ru_maxrss; it sees torch's "
                   "allocations, tracemalloc does not and is not used), reset to the current RSS via /proc/self/clear_refs "
                   "just before the measured evaluate call (after a small warm-up call); growth = peak − RSS just before "
                   "the call. ru_maxrss itself also keeps the peak of exited threads, so it cannot be reset: it is "
                   "recorded as lifetime_ru_maxrss_mib.") if args.device == "cpu" else (
                   "peak = torch.cuda.max_memory_allocated, the most memory in tensors at once (the caching allocator's "
                   "counter), its statistics reset by torch.cuda.reset_peak_memory_stats just before the measured evaluate "
                   "call (after a small warm-up call); growth = peak − torch.cuda.memory_allocated just before the call; "
                   "max_reserved_mib: the most the allocator held from the driver over the call. Host memory is not measured.")
    bound = N / statistics.median(bound_seconds)
    flop_limit = {"points_per_s": bound, "seconds": bound_seconds,
                  "fraction_reached": {name: results[name]["points_per_s"] / bound for name in methods},
                  "note": "the decoder's matrix products alone at K draws per point, one point per pass (torch.addmm per "
                          "linear layer): the arithmetic any exact method must do; fraction_reached: each method's points/s "
                          "over this bound's"}
    report = {"benchmark": "evaluate_speed", "device": args.device, "machine": machine, "setup": setup, "khat": diagnostics,
              "flop_limit": flop_limit, "command": "python benchmarks/evaluate_speed.py " + " ".join(sys.argv[1:]),
              "settings": {"points": N, "K": K, "repeats": args.repeats, "block": block, "threads": args.threads, "seed": args.seed,
                           "device": args.device, "hand_batch": args.hand_batch, "tiny": args.tiny},
              "methods": results, "notes": notes, "memory": memory, "memory_note": memory_note}
    print()
    print(format_table(report))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


def _dist_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def format_table(report: dict) -> str:
    s = report["settings"]
    device = report["device"] if report["machine"].get("cuda") is None else f"{report['device']} ({report['machine']['cuda']})"
    a, b = report["methods"]["pyrovae"]["options"], report["methods"]["pytorch"]["options"]
    lines = [f"log p(x), importance sampled, K = {s['K']}, {s['points']} points, on {device}, {s['threads']} torch threads, "
             f"{report['machine']['cpu']}",
             f"points per pass: (a) {a['points_per_pass']}" + (" (evaluate's default for the device)" if a["batch_size"] is None else "")
             + f", captured {a.get('captured')}, compiled {a['compiled']}; (b) {b['points_per_pass']}, {b['chunk']} draws at a time; (c), (d) one point per call",
             f"points/s: median of {s['repeats']} repeats; × (b): median over blocks of {s['block']} points of (b)'s time / the method's",
             f"{'method':<40} {'points/s':>9} {'× (b)':>6}  {'log p(x) mean ± s.e.':>21}  {'mean Δ vs (b)':>13}  {'max |z| vs (b): all, k̂≤0.7':>27}"]
    for name, m in report["methods"].items():
        z = "—" if "max_abs_z_vs_pytorch" not in m else f"{m['max_abs_z_vs_pytorch']:.2f}, " + _fmt(m["max_abs_z_vs_pytorch_khat_le_0.7"])
        lines.append(f"{m['label']:<40} {m['points_per_s']:>9.2f} {m['speed_vs_pytorch']:>6.2f}  "
                     f"{m['log_px_mean']:>11.3f} ± {m['log_px_se_across_points']:<7.3f}  {m['mean_diff_vs_pytorch']:>+13.4f}  {z:>27}")
    sds = ", ".join(f"{name} {_fmt(m['sd_z_vs_pytorch'])}" for name, m in report["methods"].items() if "sd_z_vs_pytorch" in m)
    lines.append(f"PSIS k̂ > 0.7 (from (a)'s weights) at {report['khat']['share_khat_above_0.7']:.0%} of the points; "
                 f"sd of z vs (b) (≈ 1 for honest standard errors): {sds}")
    if "flop_limit" in report:
        f = report["flop_limit"]
        lines.append(f"the decoder's matrix products alone: {f['points_per_s']:.2f} points/s; fraction of that reached: "
                     + ", ".join(f"{name} {v:.0%}" for name, v in f["fraction_reached"].items()))
    for name, note in report["notes"].items():
        lines.append(f"{LABELS[name]}: {note}")
    if "pythae" in report["methods"]:
        m = report["methods"]["pythae"]
        lines.append(f"pythae {m['version']}: get_nll(n_samples={s['K']}, batch_size={m['options']['batch_size']}) drew "
                     f"{m['samples_per_point_used']:.0f} samples and encoded {m['encoder_rows_per_point']:.0f} rows per point; "
                     f"its recorded log-weights reproduce its value to {m['check']['max_abs_diff_recorded_vs_get_nll']:.1e} nats")
    if report["memory"]:
        if report["device"] == "cpu":
            lines.append("peak memory of (a), fresh process each (peak RSS during the call, VmHWM reset before it):")
            lines.append(f"  {'K':>5} {'chunk':>6} {'peak RSS MiB':>13} {'growth MiB':>11}")
        else:
            lines.append("peak CUDA memory of (a), fresh process each (torch.cuda.max_memory_allocated during the call):")
            lines.append(f"  {'K':>5} {'chunk':>6} {'peak MiB':>13} {'growth MiB':>11}")
        for r in report["memory"]:
            lines.append(f"  {r['K']:>5} {r['chunk_size']:>6} {r['peak_mib']:>13.0f} {r['growth_mib']:>11.0f}")
    lines.append("s.e. across points (data variation); z: per-point difference over the combined Monte Carlo standard errors.")
    return "\n".join(lines)


def _fmt(v) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.2f}"


if __name__ == "__main__":
    sys.exit(main())
