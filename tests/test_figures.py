"""The report's curves and Experiment I figures (#20 item 13): whole-epoch ticks, the epoch
each stage restored marked, the best and the selected stage marked. What a figure marks is
read back from the drawn artists and compared with the run record written by training."""

import json

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from tiny import TINY_TRAIN  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from fastcxr.cli import app  # noqa: E402
from fastcxr.evaluate.figures import ablation_figure, curves_figure, restored_epochs  # noqa: E402
from fastcxr.runtime.runs import load_run  # noqa: E402

runner = CliRunner()


def _restored_by_hand(h: pd.DataFrame) -> list[int]:
    """Per stage, the first row whose validation loss is strictly lower than every earlier one
    of the stage and not beaten later (what an early-stopping tracker keeps)."""
    out = []
    for stage in dict.fromkeys(h["stage"]):
        best, where = float("inf"), None
        for i in np.flatnonzero(h["stage"].to_numpy() == stage):
            v = h["valid_loss"].iloc[i]
            if v < best:
                best, where = v, i
        if where is not None:
            out.append(int(where))
    return out


def test_restored_epochs_take_the_earliest_of_tied_minima_and_skip_nan():
    h = pd.DataFrame({"stage": ["head"] * 4 + ["all"] * 3,
                      "valid_loss": [0.9, 0.5, 0.5, 0.7, np.nan, 0.8, 0.6]})  # fmt: skip
    assert restored_epochs(h).tolist() == _restored_by_hand(h) == [1, 6]


@pytest.fixture(scope="module")
def ablation(prepared, tmp_path_factory):
    runs = tmp_path_factory.mktemp("fig-runs")
    res = runner.invoke(app, ["unfreeze-ablation", "--data", str(prepared), *TINY_TRAIN,
                              "--stages", "head,all", "--epochs", "3", "--patience", "3",
                              "--no-pretrained", "--loader", "datablock", "--precision", "fp32",
                              "--runs", str(runs), "--name", "abl", "--json"])  # fmt: skip
    assert res.exit_code == 0, res.output
    return runs / "abl", json.loads(res.stdout)


@pytest.mark.slow
def test_curves_mark_each_stages_restored_epoch_as_the_record_says(ablation):
    run_dir, _ = ablation
    run = load_run(run_dir)
    h = run["history"]
    fig = curves_figure(h, "Experiment I")
    ax = fig.axes[0]
    ring = next(ln for ln in ax.get_lines() if ln.get_label().startswith("restored"))
    xs = ring.get_xdata().tolist()
    # the record's 1-based best epoch within each stage, as RestoreBest counted it
    (net,) = run["record"]["networks"]  # multilabel: one network
    stages = net["stages"]
    first_row = {s: int(np.flatnonzero(h["stage"].to_numpy() == s)[0]) for s in h["stage"]}
    want = [first_row[s["name"]] + s["best_epoch"] for s in stages]  # x is 1-based
    assert xs == want
    assert [x - 1 for x in xs] == _restored_by_hand(h)
    ticks = [t for t in ax.get_xticks() if 1 <= t <= len(h)]
    assert ticks and all(float(t).is_integer() for t in ticks)


def test_the_ablation_figure_marks_the_best_and_the_selected_stage(ablation):
    _, result = ablation
    fig = ablation_figure(result)
    names = [s["name"] for s in result["stages"]]
    for ax in fig.axes:
        marks = [t for t in ax.texts if t.get_text() == "★ best"]
        assert [m.get_position()[0] for m in marks] == [names.index(result["best_stage"])]
    ring = next(ln for ln in fig.axes[0].get_lines() if ln.get_label().startswith("selected"))
    (stage,) = set(result["selected_stage"].values())  # {network: stage}, one network here
    k = names.index(stage)
    assert ring.get_xdata().tolist() == [k]
    assert ring.get_ydata().tolist() == [result["stages"][k]["valid_loss"]]


def test_the_reliability_diagrams_marker_areas_follow_the_bins_images():
    from matplotlib.collections import PathCollection

    from fastcxr.evaluate.figures import calibration_figure
    from fastcxr.evaluate.stats import calibration_bins

    rng = np.random.default_rng(0)
    evals = {}
    for name, n in (("a", 400), ("b", 150)):
        s = rng.beta(2, 5, n)  # most predictions low: bins of very different sizes
        y = (rng.random(n) < s).astype(int)
        evals[name] = {"Edema": {"calibration": calibration_bins(y, s), "ece": 0.1,
                                 "brier": 0.2}}  # fmt: skip
    fig = calibration_figure(evals, "Edema")
    dots = [c for c in fig.axes[0].collections if isinstance(c, PathCollection)]
    counts = {k: [b["n"] for b in e["Edema"]["calibration"] if b["n"]] for k, e in evals.items()}
    most = max(max(c) for c in counts.values())
    for dot, name in zip(dots, ("a", "b")):
        sizes = dot.get_sizes()
        assert len(sizes) == len(counts[name])
        # area ∝ images: every ratio of areas is the ratio of the bins' counts
        np.testing.assert_allclose(sizes / sizes.max(), np.array(counts[name]) / max(counts[name]))
    assert max(d.get_sizes().max() for d in dots) == pytest.approx(200.0)
    assert f"largest: {most}" in fig.axes[0].get_title()
