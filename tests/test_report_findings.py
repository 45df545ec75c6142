"""`fastcxr report` on runs of different findings (a compare of Edema + Pleural Effusion and a
run of Edema + No Finding): one line, exit 2 — not a KeyError traceback from the first run's
findings looked up in the other's predictions."""

import pytest

from fastcxr.evaluate.report import same_findings
from fastcxr.runtime.runs import RunError


def _rec(*findings):
    return {"config": {"train": {"findings": list(findings)}}}


def test_runs_of_one_finding_set_report_together():
    recs = {"a": _rec("Edema", "Pleural Effusion"), "b": _rec("Edema", "Pleural Effusion")}
    assert same_findings(recs) == ["Edema", "Pleural Effusion"]
    assert same_findings({}) == []


def test_runs_of_different_findings_are_refused_naming_each():
    recs = {"compare/single": _rec("Edema", "Pleural Effusion"), "nf": _rec("Edema", "No Finding")}
    with pytest.raises(RunError, match=r"nf: Edema, No Finding.*report them apart"):
        same_findings(recs)
