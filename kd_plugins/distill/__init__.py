"""Model-agnostic distillation machinery: config, teacher handling, feature capture, weight inheritance."""

from .config import DistillationConfig
from .engine import DistillationEngine, FeatureRecorder, KDResult, detect_task
from .inherit import find_layer_container, inherit_student, select_layer_indices

__all__ = [
    "DistillationConfig",
    "DistillationEngine",
    "FeatureRecorder",
    "KDResult",
    "detect_task",
    "inherit_student",
    "find_layer_container",
    "select_layer_indices",
]
