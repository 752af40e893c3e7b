"""The simulate figure with many configs stays readable: one shared "no rebalance" heat map per
distinct initial placement, one map per config, and a legend that covers no curve."""

import pytest
import torch

from eplb.simulate import SimConfig, simulate
from eplb.traces import Trace

matplotlib = pytest.importorskip("matplotlib")


def _trace(steps=8):
    return Trace(torch.tensor([3, 3, 1, 1, 2, 2, 1, 1], dtype=torch.int64).expand(steps, 2, -1).clone())


def _maps(fig):
    return [ax.get_title() for ax in fig.axes if ax.get_images()]


def test_seven_configs_draw_one_no_rebalance_map_and_seven_simulated_ones():
    configs = [SimConfig(window_size=2, step_interval=i, num_ranks=2) for i in (1, 2, 3, 4, 5, 6, 7)]
    fig = simulate(_trace(), configs, progress=False).figure()
    titles = _maps(fig)
    assert titles[0] == "no rebalance (every config)" and len(titles) == 8
    assert sum(t.startswith("no rebalance") for t in titles) == 1
    fig.canvas.draw()
    line_ax = next(ax for ax in fig.axes if ax.get_ylabel().startswith("balancedness"))
    scatter_ax = next(ax for ax in fig.axes if ax.get_xlabel().startswith("slots moved"))
    (legend,) = [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
    legend_box = legend.get_window_extent()
    assert legend_box.x0 >= line_ax.get_window_extent().x1  # beside the curves, not over them
    assert legend_box.x1 <= scatter_ax.get_window_extent().x0  # nor over the movement plot
    assert len(legend.get_texts()) == 7


def test_configs_with_other_sizes_get_their_own_no_rebalance_map(tmp_path):
    configs = [SimConfig(step_interval=2, num_ranks=2), SimConfig(step_interval=2, num_ranks=4),
               SimConfig(step_interval=3, num_ranks=4)]
    result = simulate(_trace(), configs, progress=False)
    titles = _maps(result.figure())
    static = [t for t in titles if t.startswith("no rebalance")]
    assert static == ["no rebalance (default i=2 g=2)", "no rebalance (default i=2 g=4, default i=3 g=4)"]
    result.plot(tmp_path / "p.svg")
    assert (tmp_path / "p.svg").read_text().lstrip().startswith("<?xml")
