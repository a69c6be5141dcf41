"""timm integration: :class:`KDTask` (a ``timm.task.TrainingTask``) and the ``kd-plugins-timm-train`` entry point
(``python -m kd_plugins.integrations.timm.train``)."""

from .task import KDTask, KDTrainableModule

__all__ = ["KDTask", "KDTrainableModule"]
