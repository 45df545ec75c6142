"""What the study's commands return: typed results the command line renders and `--json`
prints (#23 item 8).

Each result is a dataclass read from the JSON the library writes (`from_json`) and written
back to the same JSON (`to_json`): the keys it was read with, in their order, with the
values of its fields; a key it does not name is kept as it was (`extra`), and a key an older
record lacks is `None`. So `--json`, compare.json, ablation.json, seeds.json and the
evaluation and audit files keep their shapes, old records load, and the renderers read
attributes an editor and a type checker can follow instead of string keys.

Pure: the standard library only (the command line imports it without torch or pandas).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, TypeVar

from fastcxr.errors import DamagedRecord

R = TypeVar("R", bound="Result")
Load = Callable[[Any, str], Any]  # (JSON value, where it is) -> typed value


def _key(name: str, default: Any = None, load: Load | None = None) -> Any:
    """A field stored under another JSON key (`accuracy_at_0.5` is not a name)."""
    return field(default=default, metadata={"key": name, "load": load})


def _typed(load: Load) -> Any:
    """A field whose JSON value is read by `load` (a nested result, a map or list of them)."""
    return field(default=None, metadata={"load": load})


def _expect(v: Any, kind: type, what: str, where: str) -> None:
    if not isinstance(v, kind):
        raise DamagedRecord(f"{where}: a JSON {what} expected, not {type(v).__name__}")


def map_of(load: Load) -> Load:
    """A JSON object of values `load` reads (a null value stays None, as the JSON had it)."""

    def read(v: Any, where: str) -> dict:
        _expect(v, Mapping, "object", where)
        return {k: None if x is None else load(x, f"{where}.{k}") for k, x in v.items()}

    return read


def list_of(load: Load) -> Load:
    """A JSON list of values `load` reads (a null item stays None)."""

    def read(v: Any, where: str) -> list:
        _expect(v, list, "list", where)
        return [None if x is None else load(x, f"{where}[{i}]") for i, x in enumerate(v)]

    return read


def _dump(v: Any) -> Any:
    if isinstance(v, Result):
        return v.to_json()
    if isinstance(v, Mapping):
        return {k: _dump(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_dump(x) for x in v]
    return v


@dataclass
class Result:
    """A JSON object with typed fields. `extra`: the keys no field names; `keys`: the keys it
    was read with, in order (None when built in code: every field is written)."""

    extra: dict = field(default_factory=dict, repr=False, compare=False, kw_only=True)
    keys: tuple | None = field(default=None, repr=False, compare=False, kw_only=True)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_set", [])  # fields assigned after reading, in that order

    def __setattr__(self, name: str, value: Any) -> None:
        done = self.__dict__.get("_set")
        if done is not None and name not in done and name not in ("extra", "keys"):
            done.append(name)
        object.__setattr__(self, name, value)

    @classmethod
    def _fields(cls) -> dict[str, Any]:
        """JSON key → field, for the fields of the result (not `extra`, `keys`)."""
        return {
            f.metadata.get("key", f.name): f for f in fields(cls) if f.name not in ("extra", "keys")
        }

    @classmethod
    def from_json(cls: type[R], d: Mapping | R, where: str | None = None) -> R:
        """The result of a JSON object. A value of the wrong type where a field reads a
        nested result raises `DamagedRecord` naming its place (`where`: the path so far)."""
        if isinstance(d, cls):
            return d
        where = where or cls.__name__
        _expect(d, Mapping, "object", where)
        named = cls._fields()
        kw = {}
        for k, f in named.items():
            if k in d:
                load = f.metadata.get("load")
                kw[f.name] = (
                    load(d[k], f"{where}.{k}") if load is not None and d[k] is not None else d[k]
                )
        extra = {k: v for k, v in d.items() if k not in named}
        return cls(**kw, extra=extra, keys=tuple(d))

    @classmethod
    def read(cls: type[R], d: Mapping, source: object) -> R:
        """`from_json` of what was read from `source` (a run folder, a file): a damaged
        record's error names it."""
        try:
            return cls.from_json(d)
        except DamagedRecord as e:
            raise DamagedRecord(f"{source}: a damaged run record ({e})") from None

    def has(self, name: str) -> bool:
        """Whether the field `name` is in the JSON: read with its key, set since, or the
        result was built in code."""
        key = next(k for k, f in self._fields().items() if f.name == name)
        return self.keys is None or key in self.keys or name in self._set

    def get(self, name: str, default: Any = None) -> Any:
        """The field `name` as the JSON had it (a null kept), `default` where its key is
        absent: what `dict.get` gave on the JSON."""
        return getattr(self, name) if self.has(name) else default

    def to_json(self) -> dict:
        """The JSON object: the keys it was read with, in order, then the fields set since,
        in the order they were set, then any extras."""
        named = self._fields()
        values = {k: getattr(self, f.name) for k, f in named.items()}
        out: dict = {}
        if self.keys is None:
            out = {k: _dump(v) for k, v in values.items()}
        for k in self.keys or ():
            out[k] = _dump(values[k] if k in values else self.extra[k])
        by_name = {f.name: k for k, f in named.items()}
        for name in self._set:
            if by_name[name] not in out:
                out[by_name[name]] = _dump(getattr(self, name))
        for k, v in self.extra.items():
            if k not in out:
                out[k] = _dump(v)
        return out


# -- a finding's metrics --------------------------------------------------------------------
@dataclass
class Score(Result):
    """One finding's metrics on one set of images (any command's; unset ones are None).
    `reason`: why the metrics are undefined (one class in the set, nothing scored)."""

    n: int | None = None
    positives: int | None = None
    patients: int | None = None
    auc: float | None = None
    auc_ci: list[float] | None = None
    auc_ci_reason: str | None = None
    auc_ci_method: str | None = None
    pr_auc: float | None = None
    threshold: float | None = None
    accuracy: float | None = None
    accuracy_at_05: float | None = _key("accuracy_at_0.5")
    sensitivity: float | None = None
    specificity: float | None = None
    ece: float | None = None
    brier: float | None = None
    reason: str | None = None


Scores = map_of(Score.from_json)


@dataclass
class Spread(Result):
    """A metric across seeds: mean, sample sd, min and max of the defined values."""

    mean: float | None = None
    sd: float | None = None
    min: float | None = None
    max: float | None = None
    n: int | None = None
    reason: str | None = None


@dataclass
class SeedScore(Result):
    """One finding across seeds."""

    accuracy: Spread | None = _typed(Spread.from_json)
    auc: Spread | None = _typed(Spread.from_json)


# -- training: train, compare, unfreeze-ablation, their seed series -------------------------
@dataclass
class TrainResult(Result):
    """`fastcxr train`: a run record's summary (record.json without `complete`)."""

    findings: dict[str, Score] | None = _typed(Scores)
    networks: list | None = None
    epochs: int | None = None
    seconds_per_epoch: float | None = None
    train_seconds: float | None = None
    compile_seconds: float | None = None
    selected_stage: Any = None  # a stage name, or network → stage name
    thresholds: dict | None = None
    run_dir: str | None = None
    synthetic: bool | None = None


@dataclass
class Pair(Result):
    """DeLong's paired test of two formulations' AUCs on one finding (Holm-adjusted too)."""

    finding: str | None = None
    a: str | None = None
    b: str | None = None
    patients: int | None = None
    auc_diff: float | None = None
    diff_ci: list[float] | None = None
    p_value: float | None = None
    p_holm: float | None = None
    p_holm_reason: str | None = None
    reason: str | None = None


@dataclass
class CompareResult(Result):
    """`fastcxr compare` (Experiment II) on one seed."""

    formulations: dict[str, TrainResult] | None = _typed(map_of(TrainResult.from_json))
    pairs: list[Pair] | None = _typed(list_of(Pair.from_json))
    findings: list[str] | None = None
    auc_ci_method: str | None = None
    pairs_method: str | None = None
    thresholds: dict | None = None
    select: str | None = None
    test_set: str | None = None
    run_dir: str | None = None
    synthetic: bool | None = None
    preset: str | None = None
    arch: str | None = None
    size: int | None = None


@dataclass
class AblationStage(Result):
    """One stage of Experiment I, summed over the networks; its model's test metrics."""

    name: str | None = None
    unfreeze: str | None = None
    unfrozen: list[str] | None = None
    trainable_params: int | None = None
    epochs: int | None = None
    valid_loss: float | None = None
    train_seconds: float | None = None
    findings: dict[str, Score] | None = _typed(Scores)


@dataclass
class AblationResult(Result):
    """`fastcxr unfreeze-ablation` (Experiment I) on one seed; ★ `best_stage`."""

    stages: list[AblationStage] | None = _typed(list_of(AblationStage.from_json))
    best_stage: str | None = None
    best_stage_by_network: dict[str, str] | None = None
    best_stage_rule: str | None = None
    selected_stage: Any = None
    select: str | None = None
    thresholds: dict | None = None
    formulation: str | None = None
    run_dir: str | None = None
    synthetic: bool | None = None
    preset: str | None = None
    arch: str | None = None
    freeze_style: str | None = None
    findings: dict[str, Score] | None = _typed(Scores)
    train_seconds: float | None = None


@dataclass
class SeedsResult(Result):
    """Any experiment once per seed: each seed's result (`runs`, as its own JSON) and the
    spread by formulation or stage (`aggregate`: row → finding → spreads)."""

    seeds: list[int] | None = None
    runs: dict[str, dict] | None = None
    aggregate: dict[str, dict[str, SeedScore]] | None = _typed(map_of(map_of(SeedScore.from_json)))
    train_seconds: float | None = None
    run_dir: str | None = None
    synthetic: bool | None = None
    preset: str | None = None
    arch: str | None = None
    size: int | None = None
    findings: list[str] | None = None
    formulation: str | None = None
    formulations: list[str] | None = None


TrainingResult = TrainResult | CompareResult | AblationResult | SeedsResult


@dataclass
class PlanStage(Result):
    name: str | None = None
    unfreeze: str | None = None
    unfrozen: list[str] | None = None
    trainable_params: int | None = None
    max_epochs: int | None = None
    lr: Any = None  # a rate, or "find"


@dataclass
class AblationPlan(Result):
    """`fastcxr unfreeze-ablation --dry-run`: the stages and their trainable parameters."""

    stages: list[PlanStage] | None = _typed(list_of(PlanStage.from_json))
    arch: str | None = None
    formulation: str | None = None
    freeze_style: str | None = None
    networks: int | None = None
    total_params: int | None = None


# -- lr-find --------------------------------------------------------------------------------
@dataclass
class LRSweep(Result):
    """The finder at one stage of one network (its curve in `extra`)."""

    stage: str | None = None
    unfreeze: str | None = None
    unfrozen: list[str] | None = None
    configured_lr: Any = None
    valley: float | None = None
    minimum: float | None = None
    iterations: int | None = None


@dataclass
class LRFindResult(Result):
    """`fastcxr lr-find`: per network, a sweep per stage; the files written."""

    formulation: str | None = None
    arch: str | None = None
    size: int | None = None
    batch_size: int | None = None
    freeze_style: str | None = None
    lr_ratio: float | None = None
    networks: dict[str, list[LRSweep]] | None = _typed(map_of(list_of(LRSweep.from_json)))
    files: dict[str, str] | None = None


# -- evaluate (another dataset) -------------------------------------------------------------
@dataclass
class Overlap(Result):
    """Images and patients an evaluated dataset shares with the run's training data."""

    checked: bool | None = None
    own_dataset: bool | None = None
    images: int | None = None
    patients: int | None = None
    examples: list[str] | None = None
    reason: str | None = None


@dataclass
class ImageCounts(Result):
    in_split: int | None = None
    unscored: int | None = None
    read: int | None = None
    unreadable: int | None = None


@dataclass
class Evaluation(Result):
    """`fastcxr evaluate`: one run on another dataset (metrics.json with its `dir`), or a
    compare folder's summary (`runs`: formulation → its evaluation)."""

    name: str | None = None
    run: str | None = None
    compare: str | None = None
    formulation: str | None = None
    manifest: str | None = None
    split: str | None = None
    findings: dict[str, Score] | None = _typed(Scores)
    internal: dict[str, Score] | None = _typed(Scores)
    images: ImageCounts | None = _typed(ImageCounts.from_json)
    preprocessing_mismatch: list[str] | None = None
    overlap: Overlap | None = _typed(Overlap.from_json)
    external: bool | None = None
    calibration_method: str | None = None
    runs: dict[str, Evaluation] | None = _typed(lambda v, w: map_of(Evaluation.from_json)(v, w))
    dir: str | None = None

    def by_run(self) -> dict[str, Evaluation]:
        """Each evaluated run by name: the formulations of a compare folder, or this one."""
        return self.runs if self.runs is not None else {self.run or "": self}


# -- audit (subgroups) ----------------------------------------------------------------------
@dataclass
class Subgroup(Result):
    """One subgroup's row: the audit's metrics, or the underdiagnosis rate and its gap.
    `reasons`: metric → why it is undefined."""

    subgroup: Any = None
    small: bool | None = None
    n: int | None = None
    patients: int | None = None
    prevalence: float | None = None
    auc: float | None = None
    auc_ci: list[float] | None = None
    tpr: float | None = None
    fpr: float | None = None
    tpr_gap: float | None = None
    tpr_gap_ci: list[float] | None = None
    reasons: dict[str, str] | None = None
    n_with_finding: int | None = None
    rate: float | None = None
    gap: float | None = None
    gap_ci: list[float] | None = None
    gap_ci_reason: str | None = None
    reason: str | None = None

    def why(self, metric: str) -> str | None:
        return (self.reasons or {}).get(metric)


Subgroups = list_of(Subgroup.from_json)


@dataclass
class FindingAudit(Result):
    """One finding: the whole set (`all`), then attribute → its subgroups."""

    all: Subgroup | None = _typed(Subgroup.from_json)
    by: dict[str, list[Subgroup]] | None = _typed(map_of(Subgroups))


@dataclass
class Audit(Result):
    """`fastcxr audit`: one run's (or evaluation's) subgroups per finding, or, for a compare
    folder, `runs`: each formulation's audit."""

    source: str | None = None
    kind: str | None = None
    split: str | None = None
    manifest: str | None = None
    findings: dict[str, FindingAudit] | None = _typed(map_of(FindingAudit.from_json))
    underdiagnosis: dict[str, list[Subgroup]] | None = _typed(map_of(Subgroups))
    underdiagnosis_rule: str | None = None
    warnings: list[str] | None = None
    gap_rule: str | None = None
    ci: dict | None = None
    min_size: int | None = None
    runs: dict[str, Audit] | None = _typed(lambda v, w: map_of(Audit.from_json)(v, w))
    dir: str | None = None

    def by_run(self) -> dict[str, Audit]:
        return self.runs if self.runs is not None else {self.source or "": self}


# -- bench ----------------------------------------------------------------------------------
@dataclass
class Speed(Result):
    precision: str | None = None
    channels_last: bool | None = None
    compile: bool | None = None


@dataclass
class BenchRow(Result):
    """One stage and freezing style: img/s of each arm and fastcxr's ratios over rounds."""

    stage: str | None = None
    freeze_style: str | None = None
    limit_img_s: float | None = None
    fastcxr_img_s: float | None = None
    defaults_img_s: float | None = None
    fastcxr_vs_limit: float | None = None
    fastcxr_vs_limit_median: float | None = None
    fastcxr_vs_limit_range: list[float] | None = None
    fastcxr_vs_defaults: float | None = None
    fastcxr_vs_defaults_median: float | None = None
    fastcxr_vs_defaults_range: list[float] | None = None
    compile_s: dict[str, float] | None = None
    wide: bool | None = None
    wide_reason: str | None = None

    def vs(self, other: str) -> tuple[float | None, list[float] | None]:
        """fastcxr / `other` (limit, defaults): the median over rounds (an older result: the
        quotient of its img/s) and the range."""
        median = self.get(f"fastcxr_vs_{other}_median", getattr(self, f"fastcxr_vs_{other}"))
        return median, getattr(self, f"fastcxr_vs_{other}_range")


@dataclass
class Projection(Result):
    available: bool | None = None
    train_images: int | None = None
    networks: int | None = None
    epochs_per_stage: int | None = None
    freeze_style: str | None = None
    hours: float | None = None


@dataclass
class BenchResult(Result):
    """`fastcxr bench`: training img/s per stage and freezing style, three arms."""

    arch: str | None = None
    size: int | None = None
    batch_size: int | None = None
    device: str | None = None
    speed: Speed | None = _typed(Speed.from_json)
    rows: list[BenchRow] | None = _typed(list_of(BenchRow.from_json))
    eval_img_s: float | None = None
    rounds: int | None = None
    projection: Projection | None = _typed(Projection.from_json)


@dataclass
class PrepareBench(Result):
    """`fastcxr bench-prepare`: conversion images/s per core, fastcxr against a baseline."""

    rows: int | None = None
    cols: int | None = None
    bits_stored: int | None = None
    baseline_images_per_s_per_core: float | None = None
    fastcxr_images_per_s_per_core: float | None = None
    ratio: float | None = None
    mimic_minutes_on_16_cores: float | None = None
