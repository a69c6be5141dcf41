"""timm integration: the ``timm.task.TrainingTask`` adapters and the ``kd-plugins-timm-train`` entry point
(``python -m kd_plugins.integrations.timm.train``).

* :class:`KDTask` - distillation with any kd_plugins logit/hidden loss, OFA-KD and TransKD (composed from the term
  providers of :mod:`kd_plugins.vision`).
* :class:`ACMTask` - stage 3 of Adaptive Computation Modules (:mod:`kd_plugins.acm`).
* :class:`MultiExitTask` - multi-exit self-distillation (:mod:`kd_plugins.multiexit`).
* :class:`WADTask` - WAD, weight-aware distillation on labelled + unlabelled images (:mod:`kd_plugins.distill.wad`).
* :class:`ProCKDTask` - ProC-KD, prototype-guided cross-task distillation (:mod:`kd_plugins.vision.prockd`).
"""

from .acm import ACMTask, timm_acm_loss
from .model_task import ModelForward, ModelTask
from .multiexit import MultiExitTask, timm_multi_exit_loss
from .proc_kd import ProCKDTask
from .task import KDTask, KDTrainableModule
from .wad import WADDataset, WADTask

__all__ = [
    "KDTask",
    "KDTrainableModule",
    "ACMTask",
    "MultiExitTask",
    "ProCKDTask",
    "WADTask",
    "WADDataset",
    "ModelTask",
    "ModelForward",
    "timm_acm_loss",
    "timm_multi_exit_loss",
]
