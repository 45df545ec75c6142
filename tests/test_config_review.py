"""What the #13 review found: values the old code accepted, and damaged run records."""

import json

import numpy as np
import pytest

from fastcxr.config import TrainConfig
from fastcxr.runtime.runs import RECORD, RunError, load_run


def test_negative_seeds_and_numpy_numbers_are_accepted():
    assert TrainConfig.from_options("demo", seed=-1).seed == -1
    c = TrainConfig.from_options("demo", lr=np.float32(0.01), epochs=np.int64(2))
    assert [s.max_epochs for s in c.stages] == [2] and abs(c.stages[0].lr - 0.01) < 1e-9
    t = TrainConfig.from_options("demo", threshold="sensitivity", target=np.float64(0.8))
    assert t.threshold_target == 0.8


def test_stage_specs_as_a_list():
    a = TrainConfig.from_options("demo", stages=["head", "c5=conv5"])
    b = TrainConfig.from_options("demo", stages="head,c5=conv5")
    assert a.stages == b.stages and [s.name for s in a.stages] == ["head", "c5"]


@pytest.mark.parametrize("name", ["metrics.json", "config.json", "history.csv"])
def test_a_damaged_run_record_file_is_a_run_error_naming_it(tmp_path, name):
    (tmp_path / RECORD).write_text(json.dumps({"complete": True}))
    for f in ("config.json", "metrics.json"):
        (tmp_path / f).write_text("{}")
    for f in ("history.csv", "predictions.csv"):
        (tmp_path / f).write_text("a,b\n1,2\n")
    (tmp_path / name).write_text("" if name.endswith(".csv") else "{not json")
    with pytest.raises(RunError, match=name):
        load_run(tmp_path)


def test_a_checkpoint_of_the_previous_version_is_read_into_network_state(tmp_path):
    """The untyped layout `NetworkCheckpoint.save` wrote before #13 (positional tuples)."""
    import torch

    from fastcxr.runtime.runs import save_torch
    from fastcxr.train.checkpoint import FORMAT, NetworkState

    w = {"w": torch.ones(2)}
    nan = torch.full((3, 2), float("nan"))
    old = {
        "complete": False, "stage_index": 1, "model": w, "opt": None,
        "stage": {"epochs_done": 2, "stopping": True, "restore": (0.5, 1, w),
                  "early_stop": (0.5, 1), "smooth_loss": (6, 0.7)},
        "results": [{"epochs": 3}], "history": [{"stage": "head", "epoch": 1}],
        "summary": None, "rng": {"torch": torch.get_rng_state()},
        "valid_probs": {"head": torch.zeros(3, 2), "all": nan},
        "stage_probs": {"head": torch.ones(3, 2), "all": nan},
    }  # fmt: skip
    save_torch(tmp_path / "n.pt", old)
    s = NetworkState.load(tmp_path / "n.pt")
    assert s.stage_index == 1 and s.stage_started and not s.complete
    restore = dict(s.callbacks["restore"])
    assert torch.equal(restore.pop("best_state")["w"], w["w"])
    assert restore == {"best": 0.5, "best_epoch": 1, "epochs": 2}
    assert s.callbacks["early_stop"] == {"best": 0.5, "wait": 1, "stopping": True}
    assert s.callbacks["history"] == {"epochs_done": 2}
    assert s.callbacks["smooth_loss"] == {"count": 6, "val": 0.7}
    assert list(s.test_probs) == ["head"] and list(s.valid_probs) == ["head"]  # ran stages only
    assert s.history == [{"stage": "head", "epoch": 1}]
    s.save(tmp_path / "m.pt")
    assert torch.load(tmp_path / "m.pt", weights_only=True)["format"] == FORMAT
