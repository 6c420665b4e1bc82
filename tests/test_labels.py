"""Labels: data sets that carry them, labelled and unlabelled batches, the M2 and conditional VAEs,
the classifier's accuracy, per-class samples, and ``pyrovae train --labelled``."""

import json
import math

import numpy as np
import pyro
import pytest
import torch
from PIL import Image
from pyrovae.models import cvae, m2

from pyrovae import estimators, evidence, objectives
from pyrovae.cli.main import main
from pyrovae.data import Labelled, LabelledBatches
from pyrovae.errors import DataError, PyrovaeError
from pyrovae.evaluate import classifier_accuracy
from pyrovae.generate import sample_per_class
from pyrovae.sources import balanced_labelled, load_dataset

pytestmark = pytest.mark.usefixtures("one_thread")

# data


def test_npz_labels_are_loaded_and_split_with_their_rows(tmp_path):
    x = np.arange(40 * 4, dtype=np.float32).reshape(40, 4) / 160
    y = np.arange(40) % 3
    np.savez(tmp_path / "d.npz", train=x, y=y)
    data = load_dataset(tmp_path / "d.npz", test_fraction=0.25, seed=1)
    for rows, labels in ((data.train, data.train_labels), (data.test, data.test_labels)):
        assert torch.equal(labels, (rows[:, 0] * 160 / 4).round().long() % 3)  # each row keeps its own label
    assert data.num_classes == 3
    np.savez(tmp_path / "bad.npz", train=x, y=y[:-1])
    with pytest.raises(DataError, match=r"\['y'\] has shape \(39,\): expected one label per row"):
        load_dataset(tmp_path / "bad.npz")


BALANCED = {  # name → the function under test
    "correct": balanced_labelled,
    "broken-first-rows": lambda labels, n, seed: torch.arange(n),
    "broken-unshuffled-classes": lambda labels, n, seed: torch.arange(len(labels))[labels.argsort(stable=True)][:n].sort().values,
}


@pytest.mark.parametrize("variant", list(BALANCED))
def test_balanced_labelled_rows_are_n_over_c_per_class(variant):
    labels = torch.randint(0, 10, (1000,), generator=torch.Generator().manual_seed(0))
    rows = BALANCED[variant](labels, 100, 0)
    counts = torch.bincount(labels[rows], minlength=10)
    assert (len(rows.unique()) == 100 and torch.equal(counts, torch.full((10,), 10))) == (variant == "correct")


def test_balanced_labelled_rows_are_fixed_by_the_seed():
    labels = torch.arange(1000) % 10
    rows = balanced_labelled(labels, 100, seed=0)
    assert torch.equal(rows, balanced_labelled(labels, 100, seed=0))
    assert not torch.equal(rows, balanced_labelled(labels, 100, seed=1))
    assert torch.equal(torch.bincount(labels[balanced_labelled(labels, 23, 0)], minlength=10), torch.tensor([3, 3, 3] + [2] * 7))
    with pytest.raises(DataError, match="5 labelled points for 10 classes"):
        balanced_labelled(labels, 5, 0)
    with pytest.raises(DataError, match="has no labels"):
        balanced_labelled(None, 10, 0)


def epoch_of(batches):
    return [(idx.clone(), (xb.x.clone(), xb.y.clone()) if isinstance(xb, Labelled) else xb.clone()) for idx, xb in batches]


class LabelsOfOtherRows(LabelledBatches):
    """Broken: each labelled batch carries the labels of the next labelled rows."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.labels = self.labels.roll(1)


class UnlabelledRowsTwice(LabelledBatches):
    """Broken: the unlabelled stream is drawn with replacement."""

    def __iter__(self):
        for idx, xb in super().__iter__():
            if not isinstance(xb, Labelled):
                idx, xb = idx[:1].expand(len(idx)), xb[:1].expand(len(idx), -1)
            yield idx, xb


@pytest.mark.parametrize("kind", [LabelledBatches, LabelsOfOtherRows, UnlabelledRowsTwice], ids=["correct", "broken-labels-of-other-rows", "broken-unlabelled-rows-repeated"])
def test_labelled_batches_alternate_and_serve_every_unlabelled_row_once(kind):
    n = 50
    x = torch.arange(n, dtype=torch.float32)[:, None].expand(n, 3).contiguous()
    labels = torch.arange(n) % 5
    labelled = torch.tensor([0, 7, 13, 21, 42])
    batches = kind(x, labels, labelled, batch_size=8, seed=3, labelled_batch_size=2)
    epoch = epoch_of(batches)
    if kind is not LabelledBatches:
        with pytest.raises(AssertionError):
            check_epoch(epoch, batches, labels, labelled, n)
        return
    check_epoch(epoch, batches, labels, labelled, n)


def check_epoch(epoch, batches, labels, labelled, n):
    assert len(epoch) == len(batches) == 2 * math.ceil(45 / 8)
    unlabelled = torch.cat([idx for i, (idx, _) in enumerate(epoch) if i % 2 == 0])
    assert sorted(unlabelled.tolist()) == sorted(set(range(n)) - set(labelled.tolist()))
    for i, (idx, xb) in enumerate(epoch):
        if i % 2 == 1:  # a labelled batch, its rows and their own labels
            assert set(idx.tolist()) <= set(labelled.tolist())
            assert torch.equal(xb[0][:, 0].long(), idx) and torch.equal(xb[1], labels[idx])
        else:
            assert torch.equal(xb[:, 0].long(), idx)


def test_labelled_batches_resume_where_they_stopped():
    x, labels = torch.rand(40, 2), torch.arange(40) % 4
    first = LabelledBatches(x, labels, torch.arange(0, 40, 5), batch_size=6, seed=2, labelled_batch_size=3)
    epoch_of(first)
    iterator = iter(first)
    [next(iterator) for _ in range(3)]  # mid-epoch, a labelled batch owed
    state = first.state_dict()
    rest = epoch_of(iterator) + epoch_of(first)
    second = LabelledBatches(x, labels, torch.arange(0, 40, 5), batch_size=6, seed=2, labelled_batch_size=3)
    second.load_state_dict(state)
    again = epoch_of(second) + epoch_of(second)
    assert len(rest) == len(again)
    for (i, a), (j, b) in zip(rest, again):
        assert torch.equal(i, j)
        assert all(torch.equal(u, v) for u, v in zip(a, b)) if isinstance(a, tuple) else torch.equal(a, b)


# the models


def small(factory, **kwargs):
    torch.manual_seed(0)
    return factory(12, num_classes=3, latent_dim=2, hidden=(8,), **kwargs)


def binary(n=6, seed=1):
    return torch.bernoulli(torch.full((n, 12), 0.4), generator=torch.Generator().manual_seed(seed))


LOG_Q_BREAKS = {"correct": False, "broken-log-q-of-y-left-out": True}


@pytest.mark.parametrize("variant", list(LOG_Q_BREAKS))
def test_m2_elbo_summed_over_y_in_training_is_the_elbo_of_the_weights(float64, monkeypatch, variant):
    """TraceEnum_ELBO (y summed with its weights q(y|x)) and the Monte Carlo ELBO of the per-point
    log-weights (y drawn from q(y|x), its log q in the weight) estimate the same number: within 4
    standard errors of their difference, on the M2 model with its networks under enumeration."""
    module = small(m2).double()
    x = binary()
    if LOG_Q_BREAKS[variant]:
        original = evidence.unscaled_log_prob

        def broken(name, site, shape, compiled=False, enumerated=False):
            value = original(name, site, shape, compiled, enumerated)
            return torch.zeros_like(value) if name == "y" and not enumerated else value  # the guide's log q(y | x)

        monkeypatch.setattr(evidence, "unscaled_log_prob", broken)
    loss_fn = objectives.loss("elbo", module.model, module.guide, num_particles=200)
    with torch.no_grad():
        replicates = torch.stack([-loss_fn(x) for _ in range(20)])  # each the batch's ELBO, summed over y exactly
    terms = evidence.log_weights(module.model, module.guide, x, 20000)
    drawn = estimators.elbo(terms.log_w)
    difference = replicates.mean() - drawn.value.sum()
    stderr = math.sqrt(replicates.var().item() / len(replicates) + drawn.stderr.pow(2).sum().item())
    assert "TraceEnum_ELBO (enumerated: y)" in loss_fn.estimators["unlabelled"]
    assert (abs(difference.item()) < 4 * stderr) == (variant == "correct"), (difference, stderr)


def test_m2_labelled_batches_add_the_classifier_term(float64):
    """On a labelled batch the loss is −ELBO(x, y) − α Σ_n log q(y_n | x_n): exactly α Σ log q apart
    from the same model with α = 0, on the same draws."""
    module = small(m2, classifier_weight=7.0).double()
    x, y = binary(), torch.tensor([0, 1, 2, 2, 1, 0])
    loss_fn = objectives.loss("elbo", module.model, module.guide)
    pyro.set_rng_seed(5)
    with_term = loss_fn(Labelled(x, y))
    module.classifier_weight = 0.0
    pyro.set_rng_seed(5)
    without = loss_fn(Labelled(x, y))
    log_q = torch.log_softmax(module.encoder_y(x), -1).gather(1, y[:, None]).sum()
    assert torch.allclose(with_term - without, -7.0 * log_q, rtol=1e-12)
    assert loss_fn.estimators["labelled"] == "Trace_ELBO"


def test_accuracy_and_its_binomial_standard_error():
    a, se = estimators.accuracy(torch.tensor([0, 1, 2, 2]), torch.tensor([0, 1, 1, 2]))
    assert a == 0.75 and math.isclose(se, math.sqrt(0.75 * 0.25 / 4))
    with pytest.raises(PyrovaeError, match="same non-empty shape"):
        estimators.accuracy(torch.tensor([0]), torch.tensor([0, 1]))


def test_classifier_accuracy_is_that_of_q_y_given_x_and_leaves_a_uniform_q_out():
    module = small(m2)
    x, labels = binary(50), torch.arange(50) % 3
    found = classifier_accuracy(module.guide, x, labels, batch_size=16)
    expected = (module.classify(x) == labels).double().mean().item()
    assert set(found) == {"y"} and math.isclose(found["y"][0], expected)
    assert classifier_accuracy(small(cvae).guide, x, labels) == {}


def test_samples_per_class_decode_the_class_they_are_given():
    module = small(m2)
    like = binary(1)
    torch.manual_seed(4)
    samples = sample_per_class(module.model, like, 5, 3)
    torch.manual_seed(4)
    expected = []
    for c in range(3):
        z = torch.distributions.Normal(torch.zeros(5, 2), torch.ones(5, 2)).sample()
        one_hot = torch.nn.functional.one_hot(torch.full((5,), c), 3).float()
        expected.append(torch.sigmoid(module.decoder(torch.cat([z, one_hot], -1))))
    assert samples.shape == (15, 12)
    assert torch.allclose(samples, torch.cat(expected), atol=1e-6)


# the command line


def test_train_labelled_evaluate_accuracy_and_sample_per_class(tmp_path, capsys):
    run = tmp_path / "m2"
    assert main(["train", "--dataset", "digits", "--labelled", "50", "--epochs", "2", "--hidden", "32", "--latent-dim", "4",
                 "--batch-size", "128", "--out", str(run), "--no-progress"]) == 0
    assert "objective elbo: TraceEnum_ELBO (enumerated: y) on unlabelled batches; Trace_ELBO on labelled batches" in capsys.readouterr().out
    config = json.loads((run / "config.json").read_text())
    assert config["data"]["labelled"] == 50 and config["model"]["factory"] == "pyrovae.models:m2"
    capsys.readouterr()
    assert main(["evaluate", str(run), "-k", "20", "--limit", "40", "--no-progress", "--json", str(tmp_path / "e.json")]) == 0
    out = capsys.readouterr().out
    assert "classifier q(y | x): accuracy" in out
    summary = json.loads((tmp_path / "e.json").read_text())["summary"]
    assert 0 <= summary["classifier_accuracy"]["y"]["value"] <= 1
    assert main(["evaluate", str(run), "-k", "20", "--limit", "4", "--gaps", "--no-progress"]) == 2
    assert "--gaps does not apply to a model with discrete latent sites (y)" in capsys.readouterr().err
    assert main(["sample", str(run), "--per-class", "-n", "4", "--out", str(tmp_path / "c.png")]) == 0
    with Image.open(tmp_path / "c.png") as image:
        assert image.size == (4 * 9 + 1, 10 * 9 + 1)  # 4 columns, one row per class, 8 × 8 digits with 1-pixel padding


def test_train_labelled_refuses_a_data_set_without_labels_and_an_iwae_objective(tmp_path, capsys):
    np.save(tmp_path / "x.npy", np.random.default_rng(0).random((60, 16)).astype(np.float32))
    assert main(["train", "--dataset", str(tmp_path / "x.npy"), "--labelled", "10", "--epochs", "1", "--out",
                 str(tmp_path / "a"), "--no-progress"]) == 2
    assert "the data set has no labels" in capsys.readouterr().err
    assert main(["train", "--dataset", "digits", "--labelled", "20", "--objective", "iwae", "--epochs", "1", "--hidden", "16",
                 "--latent-dim", "2", "--out", str(tmp_path / "b"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--objective iwae cannot sum out the enumerated discrete site 'y': use --objective elbo" in err
    assert err.count("\n") == 1


def test_conditional_vae_trains_on_labels_alone_and_sums_y_out_in_evaluation():
    """Every row labelled: every batch is ``Labelled`` and the loss goes down; log p(x) of unlabelled
    points draws y from the uniform q (its log q in the weight), and the classifier report leaves it out."""
    from pyrovae.train import TrainConfig, fit

    module = small(cvae)
    x, labels = binary(60), torch.arange(60) % 3
    batches = LabelledBatches(x, labels, torch.arange(60), batch_size=20, seed=0)
    assert all(isinstance(xb, Labelled) for _, xb in batches)
    history = fit(module, batches, TrainConfig(epochs=4, batch_size=20, lr=0.02), test_x=x, progress=False)
    assert history[-1]["test_elbo"] > history[0]["test_elbo"]
    terms = evidence.log_weights(module.model, module.guide, x, 30)
    assert torch.allclose(terms.log_q["y"], torch.full((30, 60), -math.log(3)))
    assert terms.kl_method["y"] == "analytic" and torch.allclose(terms.kl_analytic["y"], torch.zeros(30, 60), atol=1e-6)
