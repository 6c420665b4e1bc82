"""The per-point picture of the inference gaps: what each bar and dot stands for, read back from the figure.

The numbers are made up so that sorting by the total gap, by the approximation gap alone and
leaving the points in their order give three different pictures; each broken variant of the sort
(``BROKEN``) is caught.
"""

import math

import matplotlib.pyplot as plt
import pytest
import torch

from pyrovae import plots
from pyrovae.estimators import Estimate
from pyrovae.gaps import Gaps, SiteSurgery, Surgery

APPROXIMATION = [0.5, 0.1, 2.0, 0.3, 0.05]
AMORTIZATION = [0.2, 1.5, -0.1, 0.1, 0.3]  # one negative estimate: drawn downward from the approximation gap
EVALUATED_GAP = [0.8, 1.4, 2.0, 0.35, 0.4]


def estimate(values) -> Estimate:
    v = torch.tensor(values, dtype=torch.float64)
    return Estimate(v, torch.full_like(v, 0.01))


def made_up_gaps() -> Gaps:
    nan = estimate([math.nan] * 5)
    return Gaps(log_px=estimate([-80.0] * 5), elbo=estimate([-81.0] * 5), elbo_optimal=estimate([-80.5] * 5),
                approximation=estimate(APPROXIMATION), amortization=estimate(AMORTIZATION),
                khat=torch.zeros(5, dtype=torch.float64), rise=nan, rise_annealed=nan, settings={})


def made_up_surgery() -> Surgery:
    site = SiteSurgery(mutual_information=estimate([2.0, 3.0, 4.0]), kl=estimate([3.0, 4.0, 6.0]),
                       marginal_kl=estimate([1.0, 1.0, 2.0]), dims=4, active_units=3)
    return Surgery({"z": site}, {}, num_points=3, num_particles=1)


BROKEN = {
    "broken-unsorted": lambda approximation, amortization: torch.arange(len(approximation)),
    "broken-sorted-by-approximation": lambda approximation, amortization: approximation.argsort(),
}


def picture_problems(fig) -> list[str]:
    """What the gaps panel shows against the made-up numbers."""
    ax = fig.axes[0]
    approximation, amortization = (list(c.patches) for c in ax.containers[:2])
    totals = [a + m for a, m in zip(APPROXIMATION, AMORTIZATION)]
    order = sorted(range(5), key=lambda n: totals[n])
    problems = []
    if [p.get_height() for p in approximation] != pytest.approx([APPROXIMATION[n] for n in order]):
        problems.append("the approximation bars are not the points sorted by their total gap")
    if [p.get_y() for p in amortization] != pytest.approx([p.get_height() for p in approximation]):
        problems.append("the amortization bars do not stand on the approximation bars")
    if [p.get_y() + p.get_height() for p in amortization] != pytest.approx(sorted(totals)):
        problems.append("the bars' tops are not the sorted total gaps")
    dots = ax.lines[0].get_ydata()
    if list(dots) != pytest.approx([EVALUATED_GAP[n] for n in order]):
        problems.append("the evaluated gaps are not drawn at their points")
    return problems


@pytest.mark.parametrize("variant", ["correct", *BROKEN])
def test_stacked_gaps_sorted_by_the_total(monkeypatch, variant):
    if variant != "correct":
        monkeypatch.setattr(plots, "gap_order", BROKEN[variant])
    fig = plots.gaps_figure(made_up_gaps(), gap=estimate(EVALUATED_GAP))
    problems = picture_problems(fig)
    plt.close(fig)
    if variant == "correct":
        assert problems == []
    else:
        assert any("sorted" in p for p in problems), problems


def test_surgery_panel_stacks_the_information_and_the_marginal_kl(tmp_path):
    """The second panel: I_q(x; z) = mean 3 nats, KL(q(z) ‖ p(z)) = 4/3 on it, the line at log N."""
    fig = plots.gaps_figure(made_up_gaps(), surgery=made_up_surgery())
    ax = fig.axes[1]
    (information,), (marginal,) = (list(c.patches) for c in ax.containers[:2])
    assert information.get_height() == pytest.approx(3.0)
    assert marginal.get_y() == pytest.approx(3.0) and marginal.get_height() == pytest.approx(4 / 3)
    assert ax.lines[0].get_ydata()[0] == pytest.approx(math.log(3))
    plt.close(fig)
    plots.save_gaps_plot(made_up_gaps(), tmp_path / "gaps.png", surgery=made_up_surgery())
    assert (tmp_path / "gaps.png").stat().st_size > 1000
