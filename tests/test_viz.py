"""viz.plot_training_curves: the figure of chapters 02 and 06 and of benchmarks/train_speed.py --plot."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from minildm.viz import plot_training_curves  # noqa: E402


def test_each_recipe_is_a_line_of_score_against_wall_minutes_with_the_target_dashed():
    rows = [{"recipe": "default", "points": [{"wall_s": 60, "score": 0.1}, {"wall_s": 180, "score": 0.4}]},
            {"recipe": "min_snr", "points": [{"wall_s": 90, "score": 0.2}]}]
    fig, ax = plot_training_curves(rows, 0.9, "target (90%)", "prompt-following", {"min_snr": "min-SNR"})
    default, min_snr, target = ax.get_lines()
    assert list(default.get_xdata()) == pytest.approx([1.0, 3.0]) and list(default.get_ydata()) == [0.1, 0.4]
    assert list(min_snr.get_xdata()) == pytest.approx([1.5]) and list(min_snr.get_ydata()) == [0.2]
    assert [line.get_label() for line in (default, min_snr, target)] == ["default", "min-SNR", "target (90%)"]
    assert set(target.get_ydata()) == {0.9} and target.get_linestyle() == "--"
    assert ax.get_xlim()[0] == 0 and ax.get_ylabel() == "prompt-following"
    plt.close(fig)
