"""fastcxr: train chest-radiograph classifiers fast and honestly, on fastai."""

__version__ = "0.1.0"

from fastcxr.config import DEMO as DEMO
from fastcxr.config import PAPER as PAPER
from fastcxr.config import Stage as Stage
from fastcxr.config import TrainConfig as TrainConfig
from fastcxr.dicom import DicomError as DicomError
from fastcxr.dicom import read_dicom as read_dicom
from fastcxr.findings import LabelPolicy as LabelPolicy
from fastcxr.formulations import FORMULATIONS as FORMULATIONS
from fastcxr.formulations import get_formulation as get_formulation
from fastcxr.manifest import read_manifest as read_manifest
from fastcxr.models import block_splitter as block_splitter
from fastcxr.models import build_model as build_model
from fastcxr.runs import load_run as load_run
from fastcxr.study import Dataset as Dataset
from fastcxr.study import ablation_plan as ablation_plan
from fastcxr.study import compare as compare
from fastcxr.study import train_formulation as train_formulation
from fastcxr.study import unfreeze_ablation as unfreeze_ablation
