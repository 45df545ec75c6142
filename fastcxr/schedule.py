"""Moved to `fastcxr.train.schedule` and `fastcxr.train.callbacks`; kept while callers move."""

from fastcxr.train.callbacks import FrozenBNEval, frozen_bn_eval  # noqa: F401
from fastcxr.train.schedule import StageResult, apply_stage, plan, run_stage, stage_lrs  # noqa: F401
from fastcxr.config import FREEZE_STYLES  # noqa: F401
