"""What the #13 review found: values the old code accepted, and damaged run records."""

import json

import numpy as np
import pytest

from fastcxr.config import TrainConfig
from fastcxr.runs import RECORD, RunError, load_run


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
