"""Typed results (#23 item 8): read from the JSON the library writes, written back to the same
JSON, with typed attributes between. Expected values are the hand-made JSON itself."""

import json

import pytest
from rich.console import Console

from fastcxr.cli import render
from fastcxr.errors import DamagedRecord, FastcxrError
from fastcxr.results import (
    Audit,
    BenchResult,
    CompareResult,
    Evaluation,
    Pair,
    Score,
    SeedsResult,
    TrainResult,
)

SCORE = {
    "n": 40,
    "positives": 12,
    "auc": 0.8125,
    "auc_ci": [0.7, 0.9],
    "accuracy": 0.75,
    "accuracy_at_0.5": 0.7,
    "threshold": 0.43,
    "future_metric": {"kept": [1, 2]},  # a key no field names
}
COMPARE = {
    "formulations": {
        "single": {
            "networks": ["edema", "pleural_effusion"],
            "findings": {"Edema": SCORE, "Pleural Effusion": {**SCORE, "auc": None}},
            "epochs": 4,
            "selected_stage": {"edema": "conv5", "pleural_effusion": "all"},
            "train_seconds": 9.0,
            "seconds_per_epoch": 2.25,
        },
        "multilabel": {
            "findings": {"Edema": SCORE},
            "epochs": 2,
            "selected_stage": "head",
            "train_seconds": 6.0,
            "seconds_per_epoch": 3.0,
        },
    },
    "auc_ci_method": "patient bootstrap",
    "pairs": [
        {
            "finding": "Edema",
            "a": "single",
            "b": "multilabel",
            "auc_diff": 0.01,
            "diff_ci": [-0.05, 0.07],
            "p_value": 0.5,
            "p_holm": 1.0,
        },
        {
            "finding": "Pleural Effusion",
            "a": "single",
            "b": "multilabel",
            "auc_diff": None,
            "reason": "one class",
            "p_holm": None,
            "p_holm_reason": "not tested",
        },
    ],  # fmt: skip
    "run_dir": "runs/c",
    "synthetic": True,
}
SEEDS = {
    "seeds": [0, 1],
    "runs": {"0": COMPARE, "1": COMPARE},
    "aggregate": {
        "single": {
            "Edema": {
                "auc": {"mean": 0.8, "sd": 0.01, "min": 0.79, "max": 0.81, "n": 2, "reason": None},
                "accuracy": {"mean": 0.7, "n": 2},
            }  # fmt: skip
        }
    },
    "train_seconds": 20.0,
}
AUDIT = {
    "runs": {
        "single": {
            "source": "runs/c/single",
            "findings": {
                "Edema": {
                    "all": {"subgroup": "all", "n": 40, "tpr": 0.8, "reasons": {}},
                    "by": {
                        "sex": [
                            {
                                "subgroup": "F",
                                "n": 20,
                                "tpr_gap": -0.1,
                                "reasons": {"auc": "one class in the subgroup"},
                            }
                        ]
                    },
                }  # fmt: skip
            },
            "underdiagnosis": None,
            "underdiagnosis_rule": "the run does not predict No Finding",
        }
    },
    "dir": "runs/c/audit",
}
EVALUATION = {
    "name": "chexpert",
    "runs": {"single": {"run": "runs/c/single", "findings": {"Edema": SCORE},
                        "overlap": {"checked": True, "images": 0, "patients": 0},
                        "images": {"in_split": 10, "read": 9, "unreadable": 1}}},
}  # fmt: skip
BENCH = {
    "arch": "resnet152",
    "speed": {"precision": "bf16", "channels_last": True, "compile": True},
    "rows": [{"stage": "head", "fastcxr_vs_limit": 0.51, "fastcxr_vs_limit_range": [0.45, 0.6]}],
    "rounds": 3,
}


@pytest.mark.parametrize(
    "cls, d",
    [
        (CompareResult, COMPARE),
        (SeedsResult, SEEDS),
        (Audit, AUDIT),
        (Evaluation, EVALUATION),
        (BenchResult, BENCH),
        (Score, SCORE),
    ],  # fmt: skip
)
def test_reading_and_writing_back_gives_the_same_json_in_the_same_order(cls, d):
    r = cls.from_json(d)
    assert json.dumps(r.to_json()) == json.dumps(d)  # same keys, order, values, at every level
    assert cls.from_json(r) is r  # a result passed where JSON is expected is kept as it is


def test_attributes_are_typed_at_every_level():
    c = CompareResult.from_json(COMPARE)
    single = c.formulations["single"]
    assert isinstance(single, TrainResult) and isinstance(single.findings["Edema"], Score)
    assert single.findings["Edema"].auc == 0.8125
    assert single.findings["Edema"].accuracy_at_05 == 0.7  # JSON key "accuracy_at_0.5"
    assert single.findings["Edema"].extra == {"future_metric": {"kept": [1, 2]}}
    assert single.selected_stage == {"edema": "conv5", "pleural_effusion": "all"}
    assert all(isinstance(p, Pair) for p in c.pairs) and c.pairs[1].p_holm_reason == "not tested"
    s = SeedsResult.from_json(SEEDS)
    assert s.aggregate["single"]["Edema"].auc.sd == 0.01
    assert s.aggregate["single"]["Edema"].accuracy.sd is None  # absent → None
    assert s.runs["0"] == COMPARE  # each seed's result is kept as its own JSON
    a = Audit.from_json(AUDIT)
    (f,) = a.by_run()["single"].findings["Edema"].by["sex"]
    assert f.why("auc") == "one class in the subgroup" and f.why("tpr") is None
    e = Evaluation.from_json(EVALUATION).by_run()["single"]
    assert (e.overlap.checked, e.images.unreadable) == (True, 1)
    one = Evaluation.from_json(EVALUATION["runs"]["single"])
    assert one.by_run() == {"runs/c/single": one}


def test_a_record_without_newer_keys_loads_and_older_bench_ratios_are_used():
    r = TrainResult.from_json({"epochs": 3})
    assert (r.findings, r.train_seconds, r.synthetic) == (None, None, None)
    assert r.to_json() == {"epochs": 3}  # nothing invented on the way back
    row = BenchResult.from_json(BENCH).rows[0]
    assert row.vs("limit") == (0.51, [0.45, 0.6])  # no median in an older result: the quotient
    newer = BenchResult.from_json({"rows": [{**BENCH["rows"][0], "fastcxr_vs_limit_median": 0.5}]})
    assert newer.rows[0].vs("limit") == (0.5, [0.45, 0.6])


def test_fields_set_after_reading_are_written_after_the_keys_read_in_the_order_set():
    r = TrainResult.from_json({"epochs": 3, "z_unknown": 1})
    r.synthetic = False  # set first, though declared after run_dir (as `fastcxr train` does)
    r.run_dir = "runs/t"
    assert list(r.to_json().items()) == [
        ("epochs", 3), ("z_unknown", 1), ("synthetic", False), ("run_dir", "runs/t")
    ]  # fmt: skip
    r.epochs = 4  # a key read is written in its place with its new value
    assert list(r.to_json())[0] == "epochs" and r.to_json()["epochs"] == 4


def test_an_empty_object_stays_empty_and_a_null_is_not_an_absent_key():
    assert Score.from_json({}).to_json() == {}
    assert TrainResult.from_json({"findings": {"Edema": {}}}).to_json() == {
        "findings": {"Edema": {}}
    }
    built = Score(auc=0.5)  # built in code: every field written
    assert list(built.to_json()) == [f for f in Score._fields()] and built.to_json()["auc"] == 0.5
    e = Evaluation.from_json({"external": None})
    assert e.has("external") and e.get("external", True) is None  # as dict.get on the JSON
    assert not Evaluation.from_json({}).has("external")
    assert Evaluation.from_json({}).get("external", True) is True
    row = BenchResult.from_json(
        {"rows": [{"fastcxr_vs_limit": 0.5, "fastcxr_vs_limit_median": None}]}
    ).rows[0]
    assert row.vs("limit") == (None, None)  # a recorded null median is not replaced


@pytest.mark.parametrize(
    "cls, d, where, what",
    [
        (CompareResult, [COMPARE], "CompareResult", "object expected, not list"),
        (TrainResult, {"findings": []}, "TrainResult.findings", "object expected, not list"),
        (TrainResult, {"findings": {"Foo": [1]}}, "TrainResult.findings.Foo", "not list"),
        (CompareResult, {**COMPARE, "pairs": {"a": 1}}, "CompareResult.pairs", "list expected"),
        (CompareResult, {**COMPARE, "pairs": [1]}, r"CompareResult.pairs\[0\]", "not int"),
        (
            Audit,
            {"runs": {"x": {"findings": {"Edema": {"by": {"sex": "F"}}}}}},
            "Audit.runs.x.findings.Edema.by.sex",
            "list expected, not str",
        ),
    ],  # fmt: skip
)
def test_a_damaged_record_is_one_error_naming_the_place(cls, d, where, what):
    with pytest.raises(DamagedRecord, match=f"^{where}: a JSON .*{what}"):
        cls.from_json(d)
    assert issubclass(DamagedRecord, FastcxrError)  # the command line prints it in one line


def test_a_damaged_record_read_from_a_folder_names_it():
    with pytest.raises(DamagedRecord, match=r"^runs/t1: a damaged run record \(TrainResult"):
        TrainResult.read({"findings": {"Foo": [1]}}, "runs/t1")


def test_a_null_inside_a_map_or_list_is_kept():
    d = {"findings": {"Edema": None}, "networks": None}
    assert TrainResult.from_json(d).to_json() == d


def test_the_table_of_a_typed_result_is_the_table_of_its_json():
    cfg = {"arch": "resnet10", "size": 32, "preset": "demo", "findings": ("Edema",),
           "threshold": "youden", "select": "best", "freeze_style": "keras"}  # fmt: skip

    def shown(page):
        c = Console(record=True, width=200, color_system=None)
        for x in (*page.stdout, *page.stderr):
            c.print(x)
        return c.export_text()

    d = {**COMPARE, "pairs": COMPARE["pairs"][:1]}
    assert shown(render.compare(d, cfg)) == shown(render.compare(CompareResult.from_json(d), cfg))
