"""ProC-KD: Prototype-guided Cross-task Knowledge Distillation ("Prototype-guided Cross-task
Knowledge Distillation for Large-scale Models", 2022).

Distillation between a teacher and a student whose label spaces differ: the teacher's head is never used. Instead

1. a prototype memory (:class:`PrototypeMemory`) learns ``K`` unit-norm prototypes from the teacher's local
   (spatial) features by online spherical k-means with an EMA update;
2. a task-adaptive augmentation (:class:`PrototypeAugmentation`) lets every student position attend over the
   prototypes and adds the gated read-out to the student's feature, ``s' = s + gamma * W_o sum_k a_k p_k``;
3. the terms (:class:`ProCKDTerms`): the student's prototype attention matches the teacher's prototype assignment
   (:func:`kd_plugins.losses.prototype_kl`), the projected augmented feature matches the teacher's prototype
   reconstruction (:func:`kd_plugins.losses.prototype_mse`), and the student's head is also trained on ``s'``.

The augmentation is a training aid: the distilled student is a plain model (its checkpoint reloads with
``timm.create_model`` + ``load_state_dict``). The timm task is :class:`kd_plugins.integrations.timm.ProCKDTask`.
Formulas and the choices the paper leaves open: ``docs/seed_methods.md`` (ProC-KD section).
"""

from .augment import PrototypeAugmentation
from .config import ProCKDConfig
from .prototypes import PrototypeMemory, feature_rows
from .terms import ProCKDTerms, feature_feeds_head

__all__ = [
    "ProCKDConfig",
    "PrototypeMemory",
    "PrototypeAugmentation",
    "ProCKDTerms",
    "feature_feeds_head",
    "feature_rows",
]
