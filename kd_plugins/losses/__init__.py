"""Distillation loss library: reference PyTorch implementations behind a name registry.

>>> from kd_plugins.losses import get_loss, kl_divergence
>>> loss = get_loss("jsd", beta=0.5, temperature=1.0)(student_logits, teacher_logits, labels=labels)
"""

from ._common import IGNORE_INDEX, log_prob_pair, reduce_rows, valid_mask
from .feature import (
    FeatureProjector,
    affinity_kl,
    affinity_mse,
    attention_kl,
    attention_mse,
    embedding_cosine,
    embedding_mse,
    hidden_cosine,
    hidden_mse,
    mean_pool,
)
from .logit import (
    dkd_loss,
    generalized_jsd,
    kl_divergence,
    logit_mse,
    ofa_loss,
    reverse_kl_divergence,
    skew_kl_divergence,
    skew_reverse_kl_divergence,
    soft_cross_entropy,
    total_variation_distance,
)
from .registry import LOSS_KINDS, LossSpec, get_loss, get_loss_function, get_loss_spec, list_losses, register_loss

__all__ = [
    "IGNORE_INDEX",
    "LOSS_KINDS",
    "LossSpec",
    "FeatureProjector",
    "get_loss",
    "get_loss_function",
    "get_loss_spec",
    "list_losses",
    "register_loss",
    "log_prob_pair",
    "reduce_rows",
    "valid_mask",
    "kl_divergence",
    "reverse_kl_divergence",
    "generalized_jsd",
    "skew_kl_divergence",
    "skew_reverse_kl_divergence",
    "total_variation_distance",
    "soft_cross_entropy",
    "dkd_loss",
    "ofa_loss",
    "logit_mse",
    "hidden_mse",
    "hidden_cosine",
    "mean_pool",
    "embedding_mse",
    "embedding_cosine",
    "affinity_kl",
    "affinity_mse",
    "attention_kl",
    "attention_mse",
]
from .dac_kl import dac_kl_loss  # noqa: E402
from .hybrid_distill import hybrid_distill_loss  # noqa: E402
from .lelp import lelp_loss  # noqa: E402
from .mdcs import mdcs_consistency_loss, mdcs_loss  # noqa: E402
from .mutual_info import mi_alpha_loss  # noqa: E402
from .pair import infonce  # noqa: E402
from .ranking import (  # noqa: E402,E501
    cprd_loss,
    dear_loss,
    first_joint_loss,
    first_ranknet_loss,
    lambdarank_loss,
    listnet_loss,
    margin_mse_loss,
    pad_candidates,
    plackett_luce_loss,
    ranknet_loss,
    ranks_from_order,
    ranks_from_scores,
)
from .sinkhorn import sinkhorn_loss  # noqa: E402
from .tinyclip import tinyclip_affinity_loss  # noqa: E402

__all__ += [
    "pad_candidates",
    "ranks_from_scores",
    "ranks_from_order",
    "first_ranknet_loss",
    "first_joint_loss",
    "margin_mse_loss",
    "ranknet_loss",
    "lambdarank_loss",
    "listnet_loss",
    "plackett_luce_loss",
    "cprd_loss",
    "dear_loss",
    "sinkhorn_loss",
    "mi_alpha_loss",
    "dac_kl_loss",
    "lelp_loss",
    "mdcs_consistency_loss",
    "mdcs_loss",
    "tinyclip_affinity_loss",
    "hybrid_distill_loss",
    "infonce",
]
from .cross_tokenizer import (  # noqa: E402
    alm_loss,
    chunk_hidden_loss,
    chunk_logprobs,
    target_token_logprobs,
    uld_loss,
)

__all__ += ["target_token_logprobs", "chunk_logprobs", "alm_loss", "chunk_hidden_loss", "uld_loss"]
from .preference import PreferenceDistillationLoss, dpo_loss, preference_distillation_loss  # noqa: E402

__all__ += ["dpo_loss", "preference_distillation_loss", "PreferenceDistillationLoss"]
from .prototype import prototype_kl, prototype_mse  # noqa: E402

__all__ += ["prototype_kl", "prototype_mse"]
