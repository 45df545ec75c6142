import numpy as np
import pandas as pd
import pytest

from fastcxr.findings import LabelPolicy, canonical_finding, canonical_findings


@pytest.fixture
def raw():
    rng = np.random.default_rng(0)
    vals = rng.choice([1.0, 0.0, -1.0, np.nan], size=(200, 2), p=[0.4, 0.3, 0.15, 0.15])
    return pd.DataFrame(
        {
            "image": [f"i{i}.png" for i in range(200)],
            "Edema": vals[:, 0],
            "Pleural Effusion": vals[:, 1],
        }
    )


def expected(raw, unc, blank):
    """Row-by-row application of the policy, independent of the vectorised code."""
    rows = []
    for _, r in raw.iterrows():
        out, keep = {}, True
        for f in ("Edema", "Pleural Effusion"):
            v = r[f]
            if np.isnan(v):
                keep &= blank != "drop"
                v = 0.0
            elif v == -1:
                keep &= unc != "drop"
                v = 1.0 if unc == "ones" else 0.0
            out[f] = int(v)
        if keep:
            rows.append((r["image"], out["Edema"], out["Pleural Effusion"]))
    return rows


@pytest.mark.parametrize("unc", ["drop", "zeros", "ones"])
@pytest.mark.parametrize("blank", ["drop", "zeros"])
def test_policies_match_row_by_row(raw, unc, blank):
    got = LabelPolicy(unc, blank).apply(raw, ["Edema", "Pleural Effusion"])
    assert list(
        got[["image", "Edema", "Pleural Effusion"]].itertuples(index=False, name=None)
    ) == expected(raw, unc, blank)


def test_per_finding_policy(raw):
    pol = LabelPolicy("drop", "drop", per_finding={"Edema": ("ones", "drop")})
    got = pol.apply(raw, ["Edema", "Pleural Effusion"])
    keep = raw["Edema"].notna() & raw["Pleural Effusion"].isin([0.0, 1.0])
    assert len(got) == keep.sum()
    assert got["Edema"].sum() == raw.loc[keep, "Edema"].isin([1.0, -1.0]).sum()


def test_bad_values_and_missing_columns(raw):
    with pytest.raises(KeyError, match="Cardiomegaly"):
        LabelPolicy().apply(raw, ["Cardiomegaly"])
    bad = raw.assign(Edema=2.0)
    with pytest.raises(ValueError, match="row 2, column 'Edema': 2.0 is not a label"):
        LabelPolicy().apply(bad, ["Edema"])
    text = raw.astype({"Edema": object})
    text.loc[5, "Edema"] = "yes"
    with pytest.raises(ValueError, match="row 7, column 'Edema': 'yes'"):
        LabelPolicy().apply(text, ["Edema"])
    with pytest.raises(ValueError, match="uncertain"):
        LabelPolicy(uncertain="maybe")


def test_aliases():
    assert canonical_finding("Pulmonary Edema") == "Edema"
    assert canonical_finding("effusion") == "Pleural Effusion"
    assert canonical_findings(["edema", "Pleural Effusion"]) == ("Edema", "Pleural Effusion")
    with pytest.raises(ValueError, match="unknown finding"):
        canonical_finding("Dragon")


def test_policy_option_strings():
    pol = LabelPolicy.parse("zeros,Pulmonary Edema=ones", "drop")
    assert pol.uncertain == "zeros" and pol.for_finding("Edema") == ("ones", "drop")
    assert pol.for_finding("Pleural Effusion") == ("zeros", "drop")
    with pytest.raises(ValueError, match="uncertain policy"):
        LabelPolicy.parse("Edema=maybe")
