"""A training session on a run folder: what ``pyrovae train`` does, callable from Python.

:class:`TrainingSession` sets up a run (model, batches, optimizer over exactly the parameters ``SVI``
would train, the learning-rate schedule), resumes it from its checkpoint where asked, and trains it
with :func:`pyrovae.train.fit`, owning everything that keeps a run safe:

- checkpoints written atomically after every epoch (and every N steps or M minutes with
  ``checkpoint_every``), ``best.pt`` at the best validation ELBO, metrics appended to
  ``metrics.jsonl``; an overwritten run replaces the old folder only once it has a checkpoint;
- SIGINT/SIGTERM: training stops after the current step, once a checkpoint is written
  (:class:`Interrupted`, with the run's folder to resume); a second signal stops at once;
- a diverged loss stops training with the last good checkpoint intact;
- several processes (``torch.distributed``): every process draws its own z, the loss and the
  gradients are summed over processes each step, a stop asked of one stops all, one writes;
- the pictures of the trained model at the end.

It prints nothing: the command line prints what :attr:`resumed` and the returned history say.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
import torch

from . import contract, distributed, params as parameters
from .context import fast_context
from .data import Batches, Dataset, Labelled, LabelledBatches, check_binarizable, static_binarized
from .sources import balanced_labelled
from .errors import Interrupted, PyrovaeError
from .objectives import elbo_loss, loss as objective_loss
from .pictures import save_run_pictures
from .plots import save_loss_curve
from .run import BEST, CHECKPOINT, Run, load_state, set_random_states
from .tensorboard import Curves
from .train import Monitor, Progress, TrainConfig, TrainingDiverged, fit, make_optimizer, make_scheduler, mean_elbo


class CheckpointSchedule:
    """Checkpoints besides every epoch's: due every N steps (``("steps", N)``), or M minutes after
    the last checkpoint (``("minutes", M)``); None: none."""

    def __init__(self, every: tuple[str, float] | None):
        self.every = every
        self.last = time.monotonic()

    def due(self, step: int) -> bool:
        if self.every is None:
            return False
        unit, n = self.every
        return step % n == 0 if unit == "steps" else time.monotonic() - self.last >= 60 * n

    def saved(self) -> None:
        self.last = time.monotonic()


class StopRequest:
    """SIGINT and SIGTERM ask training to stop after the current step, once a checkpoint is written."""

    CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}

    def __init__(self):
        self.signal = None

    @contextlib.contextmanager
    def installed(self):
        def handler(signum, frame):
            if self.signal is not None:  # asked twice: stop now (the last checkpoint stays intact)
                raise KeyboardInterrupt
            self.signal = signum

        if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
            yield self
            return
        previous = {s: signal.signal(s, handler) for s in self.CODES}
        try:
            yield self
        finally:
            for s, h in previous.items():
                signal.signal(s, h)

    def check(self, run: Run, epoch: int, step: int | None) -> None:
        """:class:`Interrupted` if a signal came (the checkpoint is written by then)."""
        if self.signal is None:
            return
        where = f"epoch {epoch} and {step} steps" if step is not None else f"epoch {epoch}"
        name = signal.Signals(self.signal).name
        raise Interrupted(f"{name}: stopped after {where}, checkpoint written", self.CODES[self.signal], run.path)


class TrainingSession:
    """Training of the run ``run`` on ``data`` on ``device``; see the module docstring.

    ``resume``: continue from the run's checkpoint (``new_lr``: the config's ``lr`` was changed for
    this resumption, so it replaces the saved rate and the schedule's base). ``overwrite``: the run
    replaces an existing folder once it has a checkpoint. ``checkpoint_every``: see
    :class:`CheckpointSchedule`. ``tensorboard``: write curves to RUN/tensorboard.
    """

    def __init__(self, run: Run, data: Dataset, device: torch.device, *, resume: bool = False, new_lr: bool = False,
                 overwrite: bool = False, checkpoint_every: tuple[str, float] | None = None, tensorboard: bool = False,
                 progress: bool = True):
        self.run, self.data, self.device = run, data, device
        self.resume, self.new_lr, self.overwrite = resume, new_lr, overwrite
        self.tensorboard, self.progress = tensorboard, progress
        self.rank, self.size = distributed.world()
        self.main_process = self.rank == 0
        self.config = TrainConfig(**run.config["train"])
        self.schedule, self.stop = CheckpointSchedule(checkpoint_every), StopRequest()
        self.resumed: tuple[int, int] | None = None  # (epoch, steps into the next) where a resumed run went on
        self._setup()

    # set-up

    def _setup(self) -> None:
        config, data, device = self.config, self.data, self.device
        torch.manual_seed(config.seed)
        parameters.clear()
        self.model = model = self.run.build_model(data, device)
        d = self.run.config["data"]
        if d["binarize"] is None:  # decided by the observed site: binary data are binarized afresh each pass
            support = contract.observed_support(model.model, model.guide, data.train[:8].to(device))
            d["binarize"] = "dynamic" if contract.is_binary(support) else "none"
        check_binarizable(data.train, d["binarize"])
        sample = data.train[:8] if d["binarize"] == "none" else static_binarized(data.train[:8], config.seed)
        contract.check(model.model, model.guide, sample.to(device), "the training data")
        if not self.resume and callable(getattr(model, "initialize", None)):
            model.initialize(data.train.to(device))  # a model's data-dependent initialization (e.g. its output bias)
        probe = objective_loss(config.objective, model.model, model.guide, config.num_particles)
        probe.discrete(sample.to(device))  # refuses, before any folder is written, an objective that cannot train the discrete sites
        if d.get("labelled") and data.train_labels is not None:
            probe.discrete(Labelled(sample.to(device), data.train_labels[:8].to(device)))
        self.estimators = probe.estimators  # "unlabelled"/"labelled" → the estimator training uses
        if d.get("labelled") and self.size > 1:
            raise PyrovaeError("training with `labelled` runs in one process: its labelled and unlabelled batches are not sharded")
        if d.get("labelled"):  # semi-supervised: N labels kept, N/C per class (Kingma et al. 2014), the rest unlabelled
            n = min(d["labelled"], len(data.train))
            rows = torch.arange(len(data.train)) if n == len(data.train) else balanced_labelled(data.train_labels, n, config.seed)
            batches = LabelledBatches(data.train, data.train_labels, rows, config.batch_size, d["binarize"], seed=config.seed, device=device)
        else:
            batches = Batches(data.train, config.batch_size, d["binarize"], seed=config.seed, device=device)
        self.batches = distributed.ShardedBatches(batches, self.rank, self.size) if self.size > 1 else batches
        self.test_x = self.run.eval_split(data).to(device)
        self.valid_x = None if data.valid is None else self.run.eval_split(data, "valid").to(device)
        self.trained = parameters.trainable(model.model, model.guide, self.batches.peek(8))
        self.optimizer = make_optimizer(self.trained.values(), config.lr)
        self.scheduler, self.monitor = make_scheduler(self.optimizer, config), Monitor()
        self.start_epoch, self.resume_from = 0, None
        if self.resume:
            self._load()
        else:
            self._create()
        if self.size > 1:  # each process draws its own z
            torch.manual_seed(distributed.rank_seed(self.rank))

    def _load(self) -> None:
        config = self.config
        state = self.run.load_checkpoint()
        if state["epoch"] >= config.epochs and not (state["epoch"] == config.epochs and state.get("progress")):
            raise PyrovaeError(f"{self.run.path} has trained {state['epoch']} epochs already: "
                               f"give `epochs` above {state['epoch']}")
        load_state(self.model, self.trained, state)
        self.optimizer.load_state_dict(state["optimizer"])
        self.batches.load_state_dict(state["batches"])
        set_random_states(state)
        if self.scheduler is not None and state.get("scheduler"):
            self.scheduler.load_state_dict(state["scheduler"])
        if state.get("monitor"):
            self.monitor = Monitor(**state["monitor"])
        if self.new_lr:  # a new rate asked for: from now on, and as the schedule's base
            for group in self.optimizer.param_groups:
                group["lr"] = config.lr
            if self.scheduler is not None and hasattr(self.scheduler, "base_lrs"):
                self.scheduler.base_lrs = [config.lr] * len(self.optimizer.param_groups)
        self.start_epoch = state["epoch"]
        if state.get("progress"):
            self.resume_from = Progress(**state["progress"])
        self.resumed = (self.start_epoch, self.resume_from.step if self.resume_from else 0)
        if self.main_process:
            self.run.truncate_metrics(self.start_epoch)
            self.run.save_config()

    def _create(self) -> None:
        if self.size > 1:
            torch.distributed.barrier()  # every process has checked the folder before the first writes to it
        if not self.main_process:
            return
        self.run = Run.create(self.run.path, self.run.config, overwrite=self.overwrite)
        model_file = self.run.config["model"].get("file")
        if model_file:
            self.run.copy_model_file(model_file["original"])
        with fast_context():
            test_elbo = mean_elbo(elbo_loss(self.model.model, self.model.guide), self.test_x)
        self.run.append_metrics({"epoch": 0, "train_elbo": None, "test_elbo": test_elbo, "seconds": 0.0})
        self.save(0)

    # checkpoints and hooks

    def save(self, epoch: int, progress: dict | None = None, name: str = CHECKPOINT) -> None:
        """The checkpoint after ``epoch`` (and ``progress`` into the next), written atomically by one process."""
        if self.main_process:  # one writer; every process holds the same state
            extra = {"monitor": self.monitor.to_dict(),
                     "scheduler": None if self.scheduler is None else self.scheduler.state_dict()}
            self.run.save_checkpoint(self.model, self.trained, self.optimizer, self.batches, epoch, progress, extra, name)

    def _on_epoch_end(self, metrics: dict) -> None:
        if self._curves is not None:
            self._curves.epoch(metrics, self.model, self.test_x if self.valid_x is None else self.valid_x)
        if self.main_process:
            self.run.append_metrics(metrics)
            self.save(metrics["epoch"])
            if metrics.get("best"):
                self.save(metrics["epoch"], name=BEST)
            self.run.commit()
        self.schedule.saved()
        self.stop.check(self.run, metrics["epoch"], None)

    def _on_step_end(self, progress: Progress) -> None:
        mid_epoch = progress.step < len(self.batches)
        if mid_epoch and (self.stop.signal is not None or self.schedule.due(progress.step)):
            self.save(progress.epoch - 1, progress.to_dict())
            self.schedule.saved()
            self.stop.check(self.run, progress.epoch - 1, progress.step)

    def _sync(self):
        """The step's reduction over processes (None in one process): sums the loss and the
        gradients, and turns a stop asked of any process into a stop of this one."""
        if self.size == 1:
            return None
        params = list(self.trained.values())

        def sync(loss: torch.Tensor) -> float:
            total, stop_any = distributed.sum_over_processes(loss, self.stop.signal is not None, params)
            if stop_any and self.stop.signal is None:  # another process was asked to stop: stop together
                self.stop.signal = signal.SIGTERM
            return total

        return sync

    # training

    def train(self) -> list[dict]:
        """Train to ``config.epochs``; returns the run's metrics, one dict per epoch (epoch 0 first)."""
        self._curves = Curves(self.run.path / "tensorboard", self.data.image_shape) if self.tensorboard and self.main_process else None
        try:
            with self.stop.installed():
                fit(self.model, self.batches, self.config, self.test_x, self.optimizer, self.start_epoch,
                    self._on_epoch_end, progress=self.progress and self.main_process, on_step_end=self._on_step_end,
                    resume_from=self.resume_from, valid_x=self.valid_x, scheduler=self.scheduler, monitor=self.monitor,
                    sync=self._sync())
        except TrainingDiverged as e:
            if self.main_process:
                self.run.discard()
            if self.run.replaces is not None:
                raise TrainingDiverged(f"{e}; {self.run.replaces} was left as it was") from None
            last = self.run.load_checkpoint()
            where = f"epoch {last['epoch']}" + (f" and {last['progress']['step']} steps" if last.get("progress") else "")
            raise TrainingDiverged(f"{e}; the last good checkpoint, {self.run.path / CHECKPOINT} ({where}), is intact: "
                                   f"resume it with a smaller `lr`, `clip_grad` or `skip_nonfinite`") from None
        except BaseException:
            if self.main_process:
                self.run.discard()
            raise
        finally:
            if self._curves is not None:
                self._curves.close()
        if self.main_process:
            self.pictures()
        return self.run.metrics()

    def pictures(self) -> None:
        """samples.png, reconstructions.png, interpolations.png (image data only) and loss.png in the run folder."""
        if hasattr(self.model, "eval"):
            self.model.eval()
        if self.data.image_shape is not None:
            save_run_pictures(self.model, self.test_x, self.data.image_shape, self.run.path)
        save_loss_curve(self.run.metrics(), self.run.path / "loss.png")


__all__ = ["CheckpointSchedule", "StopRequest", "TrainingSession"]
