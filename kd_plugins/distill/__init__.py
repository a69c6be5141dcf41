"""The distillation core and model-agnostic machinery: config, teacher, loss terms, normalisation, projectors, the
fused path, weight inheritance (see docs/conventions.md, "The distillation core")."""

from .batching import TopicAwareBatches, spherical_kmeans
from .bistil import bistil_config, regular_layer_map
from .cache import TeacherCache, build_teacher_cache, load_teacher_cache, save_teacher_cache
from .config import DistillationConfig
from .engine import DistillationEngine, FeatureRecorder, KDResult, detect_task
from .fused import FusedLogitLoss
from .inherit import find_layer_container, inherit_student, select_layer_indices
from .onpolicy import OnPolicySampler, on_policy_batch
from .pairs import PairCollator, split_pairs
from .projectors import ProjectorBank
from .scaling import LossScaling
from .teacher import Teacher, freeze_teacher
from .teacher_scores import score_features, score_teachers, score_teachers_per_class
from .teacher_set import TeacherSet
from .terms import check_finite, weighted_sum

__all__ = [
    "DistillationConfig",
    "DistillationEngine",
    "FeatureRecorder",
    "KDResult",
    "detect_task",
    "Teacher",
    "freeze_teacher",
    "LossScaling",
    "weighted_sum",
    "check_finite",
    "FusedLogitLoss",
    "ProjectorBank",
    "inherit_student",
    "find_layer_container",
    "select_layer_indices",
    "bistil_config",
    "regular_layer_map",
    "TeacherCache",
    "PairCollator",
    "TopicAwareBatches",
    "spherical_kmeans",
    "OnPolicySampler",
    "on_policy_batch",
    "split_pairs",
    "build_teacher_cache",
    "save_teacher_cache",
    "load_teacher_cache",
    "TeacherSet",
    "score_teachers",
    "score_teachers_per_class",
    "score_features",
]
