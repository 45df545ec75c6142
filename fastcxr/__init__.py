"""fastcxr: train chest-radiograph classifiers fast and honestly, on fastai."""

import warnings

__version__ = "0.1.0"

# fastai's import calls the deprecated torch.jit.script; that warning is not the user's concern.
warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)

from fastcxr.config import DEMO as DEMO  # noqa: E402
from fastcxr.config import PAPER as PAPER  # noqa: E402
from fastcxr.config import Stage as Stage  # noqa: E402
from fastcxr.config import TrainConfig as TrainConfig  # noqa: E402
from fastcxr.dicom import DicomError as DicomError  # noqa: E402
from fastcxr.dicom import read_dicom as read_dicom  # noqa: E402
from fastcxr.findings import LabelPolicy as LabelPolicy  # noqa: E402
from fastcxr.formulations import FORMULATIONS as FORMULATIONS  # noqa: E402
from fastcxr.formulations import get_formulation as get_formulation  # noqa: E402
from fastcxr.manifest import read_manifest as read_manifest  # noqa: E402
from fastcxr.models import block_splitter as block_splitter  # noqa: E402
from fastcxr.models import build_model as build_model  # noqa: E402
from fastcxr.preprocessing import Preprocessing as Preprocessing  # noqa: E402
from fastcxr.runs import load_run as load_run  # noqa: E402
from fastcxr.study import Dataset as Dataset  # noqa: E402
from fastcxr.study import ablation_plan as ablation_plan  # noqa: E402
from fastcxr.study import compare as compare  # noqa: E402
from fastcxr.study import compare_seeds as compare_seeds  # noqa: E402
from fastcxr.study import train_formulation as train_formulation  # noqa: E402
from fastcxr.study import train_seeds as train_seeds  # noqa: E402
from fastcxr.study import unfreeze_ablation as unfreeze_ablation  # noqa: E402
