"""`TrainConfig.from_options` and the configuration's own validation."""

import dataclasses

import pytest

from fastcxr.config import DEMO, PAPER, PAPER_STAGES, Stage, TrainConfig
from fastcxr.errors import UsageError


def test_no_options_is_the_preset():
    assert TrainConfig.from_options("demo") == DEMO
    assert TrainConfig.from_options("paper") == PAPER


def test_options_replace_preset_values():
    c = TrainConfig.from_options(
        "paper", arch="resnet18", size=64, batch_size=8, patience=1, weights=__file__,
        pretrained=False, freeze_style="fastai", seed=3, workers=0, loader="datablock",
        precision="fp32", compile=True, compile_backend="eager", threshold="sensitivity",
        target=0.9, select="last", uncertain="zeros,Edema=ones", blank="zeros",
    )  # fmt: skip
    assert (c.arch, c.size, c.batch_size, c.patience) == ("resnet18", 64, 8, 1)
    assert c.weights == str(__file__) and isinstance(c.weights, str)
    assert (c.pretrained, c.freeze_style, c.seed, c.workers) == (False, "fastai", 3, 0)
    assert (c.loader, c.precision, c.compile, c.compile_backend) == (
        "datablock",
        "fp32",
        True,
        "eager",
    )
    assert (c.threshold, c.threshold_target, c.select) == ("sensitivity", 0.9, "last")
    assert (c.uncertain, c.blank) == ("zeros,Edema=ones", "zeros")
    untouched = {"lr_ratio", "weight_decay", "augment", "findings", "stages", "preset"}
    for name in untouched:
        assert getattr(c, name) == getattr(PAPER, name)


def test_stages_epochs_and_lr():
    c = TrainConfig.from_options("demo", stages="head,c5=conv5", epochs=3, lr=0.01)
    want = (Stage("head", "head", 3, 0.01), Stage("c5", "conv5", 3, 0.01))
    assert c.stages == want and c.ablation_stages == want
    # --epochs alone applies to every stage of both schedules, keeping their learning rates
    e = TrainConfig.from_options("demo", epochs=1)
    assert [s.max_epochs for s in e.stages] == [1] * len(DEMO.stages)
    assert [s.lr for s in e.ablation_stages] == [s.lr for s in DEMO.ablation_stages]
    assert len(e.ablation_stages) == len(PAPER_STAGES)


def test_findings_text_or_names_in_the_vocabulary():
    assert TrainConfig.from_options("demo", findings="edema, effusion").findings == (
        "Edema", "Pleural Effusion"
    )  # fmt: skip
    assert TrainConfig.from_options("demo", findings=["Edema"]).findings == ("Edema",)
    with pytest.raises(UsageError, match="--findings"):
        TrainConfig.from_options("demo", findings="Edema,Nonsense")


@pytest.mark.parametrize(
    "options, message",
    [
        (
            {"freeze_style": "Keras"},
            "freeze style 'Keras'; --freeze-style must be one of keras, fastai",
        ),
        ({"loader": "fastest"}, "loader 'fastest'; --loader must be one of auto, fast, datablock"),
        ({"precision": "fp16"}, "--precision must be one of auto, bf16, fp32"),
        ({"threshold": "f1"}, "--threshold must be one of youden, sensitivity, specificity"),
        ({"select": "worst"}, "--select must be one of best, last"),
        ({"size": 4}, "--size must be an integer >= 8"),
        ({"batch_size": 0}, "--batch-size must be an integer >= 1"),
        ({"patience": 0}, "--patience must be an integer >= 1"),
        ({"workers": -1}, "--workers must be 0 or more"),
        ({"epochs": 0}, "--epochs must be at least 1"),
        ({"lr": -1.0}, "--lr must be a positive number"),
        ({"lr": float("nan")}, "--lr must be a positive number"),
        ({"target": 0.8}, "--target needs --threshold sensitivity or specificity"),
        ({"threshold": "specificity"}, "needs --target X"),
        ({"uncertain": "maybe"}, "--uncertain/--blank"),
        ({"stages": ""}, "--stages is empty"),
        ({"stages": "head,head"}, "repeats a stage name"),
    ],
)
def test_bad_options_name_the_option(options, message):
    with pytest.raises(UsageError) as e:
        TrainConfig.from_options("demo", **options)
    assert message in str(e.value)


def test_unknown_preset_lists_the_presets():
    with pytest.raises(UsageError, match="--preset must be one of demo, paper, not 'big'"):
        TrainConfig.from_options("big")


def test_library_callers_are_validated_too():
    with pytest.raises(UsageError, match="keras, fastai"):
        TrainConfig(freeze_style="Keras")
    with pytest.raises(UsageError):
        dataclasses.replace(DEMO, precision="half")
    with pytest.raises(UsageError, match="pretrained must be True or False"):
        TrainConfig(pretrained="no")


def test_replace_can_reset_a_field():
    c = DEMO.replace(threshold="sensitivity", threshold_target=0.8, workers=2)
    r = c.replace(threshold="youden", threshold_target=None, workers=None)
    assert r.threshold_target is None and r.workers is None and r.threshold == "youden"
    with pytest.raises(UsageError, match="no field"):
        DEMO.replace(max_train_images=10)


def test_to_dict_from_dict_round_trip_ignores_old_keys():
    c = TrainConfig.from_options("demo", stages="head,all", seed=2)
    d = c.to_dict()
    assert TrainConfig.from_dict(d) == c
    assert TrainConfig.from_dict({**d, "max_train_images": None}) == c  # older records
