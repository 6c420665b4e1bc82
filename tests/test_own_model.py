"""A user's own model, written in any of Pyro's styles, trained exactly as SVI trains it and
carried through every command; contract violations answered in one line."""

import json
from pathlib import Path

import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO

from pyrovae import factory, params
from pyrovae.cli.main import main
from pyrovae.data import Batches
from pyrovae.train import TrainConfig, fit

MODELS = Path(__file__).parent / "models"
STYLES = ["tutorial", "pyro_module", "bare_param", "hierarchical", "reversed_guide", "plain_child"]
P = 16


def build(style: str, path: Path = MODELS / "styles.py"):
    ref = f"{path}:{style}"
    return factory.build(factory.load(ref), ref, P, None, {})


def binary(n: int = 40, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.bernoulli(torch.rand(n, P, generator=g).clamp(0.2, 0.8), generator=g)


def svi_parameters(model) -> tuple[set[str], set[str]]:
    """(what ``SVI.step`` hands its optimizer, by SVI's own discovery; what two steps change)."""
    svi = SVI(model.model, model.guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
    with poutine.trace(param_only=True) as capture:
        svi.step(binary())
    store = pyro.get_param_store()
    before = {name: p.detach().clone() for name, p in store._params.items()}
    svi.step(binary(seed=1))
    changed = {name for name, p in store._params.items() if not torch.equal(p, before[name])}
    return set(capture.trace.nodes), changed


@pytest.mark.parametrize("style", STYLES)
def test_fit_trains_exactly_the_parameters_svi_trains(style):
    torch.manual_seed(0)
    expected, svi_changed = svi_parameters(build(style))
    pyro.clear_param_store()

    torch.manual_seed(0)
    model = build(style)
    x = binary()
    found = params.trainable(model.model, model.guide, x)
    assert set(found) == expected
    store = pyro.get_param_store()
    assert all(found[name] is store._params[name] for name in found)  # the live tensors, not copies
    everything = dict(store._params)
    if isinstance(model, torch.nn.Module):
        everything.update({f"module:{n}": p for n, p in model.named_parameters()})
    before = {name: p.detach().clone() for name, p in everything.items()}

    fit(model, Batches(x, 10), TrainConfig(epochs=2, batch_size=10, lr=1e-2), progress=False)
    changed = {name for name, p in everything.items() if not torch.equal(p, before[name])}
    assert {n for n in changed if not n.startswith("module:")} == svi_changed  # what SVI changes, and only that
    trained_ids = {id(p) for p in found.values()}
    assert all(id(p) in trained_ids for name, p in everything.items() if name in changed)
    if style == "plain_child":
        assert not any("plain" in name for name in changed)
    if style == "bare_param":
        assert pyro.param("obs_scale").item() != 1.0


def test_broken_variant_module_parameters_only_misses_the_bare_param():
    """The defect this guards against: optimizing ``module.parameters()`` leaves ``obs_scale`` at 1."""
    model = build("bare_param")
    found = params.trainable(model.model, model.guide, binary())
    assert "obs_scale" in found and not any(p is found["obs_scale"] for p in model.parameters())


def run_ok(argv, capsys) -> str:
    code = main([*map(str, argv)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.out


@pytest.mark.slow
@pytest.mark.parametrize("style", STYLES[:5])
def test_every_command_works_on_a_users_model(style, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    model = f"{MODELS / 'styles.py'}:{style}"
    run_ok(["train", "--model", model, "--epochs", "1", "--out", "run", "--no-progress"], capsys)
    out = run_ok(["train", "--resume", "--epochs", "2", "--out", "run", "--no-progress"], capsys)
    assert "resuming run after epoch 1 of 2" in out
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 2
    if style == "bare_param":
        assert state["params"]["obs_scale"].item() != 0.0  # log 1 = 0 at the start: it was trained
    for command in ("sample", "reconstruct", "interpolate"):
        assert "wrote" in run_ok([command, "run"], capsys)
    out = run_ok(["evaluate", "run", "-k", "20", "--limit", "5", "--particles-elbo", "5", "--no-compile", "--no-progress"], capsys)
    assert "log p(x), importance sampled (K=20)" in out
    assert (tmp_path / "run" / "model.py").read_bytes() == (MODELS / "styles.py").read_bytes()


def test_a_changed_model_file_is_noted_and_the_recorded_copy_used(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    mine = tmp_path / "mine.py"
    mine.write_text((MODELS / "styles.py").read_text())
    run_ok(["train", "--model", f"{mine}:tutorial", "--epochs", "1", "--out", "run", "--no-progress"], capsys)
    mine.write_text("raise RuntimeError('edited')\n")
    assert main(["sample", "run"]) == 0
    err = capsys.readouterr().err
    assert f"note: {mine} has changed since training; using the copy recorded in run/model.py" in err


def test_model_args_reach_the_factory_and_are_recorded(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    run_ok(["train", "--model", f"{MODELS / 'styles.py'}:tutorial", "--model-arg", "latent_dim=3",
            "--epochs", "1", "--out", "run", "--no-progress"], capsys)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["model"]["args"] == {"latent_dim": 3}
    assert config["model"]["file"]["sha256"] == factory.sha256(MODELS / "styles.py")
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert state["module"]["decoder.0.weight"].shape == (16, 3)


VIOLATIONS = [
    ("plate_at_dim_2", r"site 'z' of the model has the data plate at dim -2, not -1"),
    ("missing_to_event", r"the model raised ValueError: Shape mismatch inside plate\('data'\) at site x dim -1, 8 vs 64; a site's batch shape must be exactly \(N,\).*\.to_event\(\)"),
    ("guide_misses_a_latent", r"latent site 'w' of the model is not sampled by the guide"),
    ("no_observed_site", r"the model has no observed site"),
    ("guide_site_not_in_model", r"guide site 'extra' has no site of that name in the model"),
    ("global_latent", r"latent site 'scale' of the model is outside pyro.plate.*not supported yet"),
    ("factory_raises", r"the model factory .*broken.py:factory_raises raised ValueError: latent_dim must be even"),
    ("no_model", r"returned a Linear without a callable model\(x\)"),
    ("not_there", r"broken.py has no 'not_there'; it defines: .*factory_raises"),
]


@pytest.mark.parametrize("name, message", VIOLATIONS, ids=[v[0] for v in VIOLATIONS])
def test_a_contract_violation_is_one_line_exit_2_and_leaves_no_run_folder(name, message, tmp_path, monkeypatch, capsys):
    from test_cli import assert_one_line_error

    monkeypatch.chdir(tmp_path)
    assert main(["train", "--model", f"{MODELS / 'broken.py'}:{name}", "--out", "run", "--no-progress"]) == 2
    assert_one_line_error(capsys.readouterr(), "train", message)
    assert not (tmp_path / "run").exists()


def test_a_model_file_with_a_syntax_error_names_the_line(tmp_path, monkeypatch, capsys):
    from test_cli import assert_one_line_error

    bad = tmp_path / "bad.py"
    bad.write_text("def vae(data_dim\n")
    assert main(["train", "--model", f"{bad}:vae", "--out", str(tmp_path / "run")]) == 2
    assert_one_line_error(capsys.readouterr(), "train", r"bad.py, line 1: syntax error")
    assert not (tmp_path / "run").exists()


def test_list_names_every_builtin_component(capsys):
    from pyrovae.guides import GUIDES
    from pyrovae.models import LIKELIHOODS, PRIORS

    from pyrovae.models.vae import NETWORKS

    out = run_ok(["list"], capsys)
    for names in (PRIORS.names(), LIKELIHOODS.names(), GUIDES.names(), NETWORKS):
        for name in names:
            assert any(line.split()[:1] == [name] for line in out.splitlines()), name
