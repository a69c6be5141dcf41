"""Draft models cut from their target, and the DistillSpec recipe that trains them.

DistillSpec (Zhou et al., "DistillSpec: Improving Speculative Decoding via Knowledge Distillation", ICLR 2024)
distils a small draft from its target so that speculative decoding keeps more of the draft's tokens. The acceptance
of a drafted token is ``sum_v min(p_v, q_v) = 1 - TVD(p, q)`` (``p`` target, ``q`` draft), so the paper compares
divergences that bound it (forward KL, reverse KL, generalised JSD, TVD) and data sources, and finds on-policy data
(completions the draft samples itself, scored by the target) the most reliable. In kd_plugins that is an ordinary
distillation run::

    from kd_plugins import DistillationCallback, DraftEvalCallback
    from kd_plugins.speculative import build_draft, distillspec_config

    draft = build_draft(target, num_layers=6)                      # the target's first 6 layers, norm and head
    trainer = Trainer(model=draft, args=args, train_dataset=prompt_completion_ds, eval_dataset=eval_ds,
                      callbacks=[DistillationCallback(target, distillspec_config("tvd")),   # lmbda=1: on-policy
                                 DraftEvalCallback(target, temperature=1.0, every_n_steps=50)])

``prompt_completion_ds`` must say where each prompt ends (``labels`` = -100 on the prompt, see
:mod:`kd_plugins.distill.onpolicy`): the draft generates the completions.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn as nn

from .._config import resolve_config
from ..distill.config import DistillationConfig
from ..distill.inherit import inherit_student
from ..losses import get_loss_spec
from .vocab import check_same_vocabulary

__all__ = ["DISTILLSPEC_DIVERGENCES", "build_draft", "distillspec_config"]

#: The divergences DistillSpec compares (registry names; ``fkl``, ``rkl``, ``gkd``, ``total_variation`` are aliases).
DISTILLSPEC_DIVERGENCES = ("kl", "reverse_kl", "jsd", "tvd")


def build_draft(target: nn.Module, num_layers: int = 6, strategy: str | Sequence[int] = "first") -> nn.Module:
    """A draft for ``target``: a deep copy that keeps ``num_layers`` of its transformer blocks (the first ones by
    default, as DistillSpec's drafts and the usual layer-skipping drafts do), its embeddings, final norm and LM head
    (tied to the embeddings when the target's are). Built by :func:`kd_plugins.inherit_student`, so it is a plain
    ``from_pretrained``-able model of the target's class; ``strategy`` is passed on (``"first"``, ``"uniform"``,
    ``"last"`` or layer indices). The draft's parameters are trainable even when the target's are frozen (as a
    :class:`~kd_plugins.distill.teacher.Teacher` leaves them); the target is left untouched.
    """
    draft = inherit_student(target, num_layers=num_layers, strategy=strategy)
    check_same_vocabulary(target, draft)
    return draft.requires_grad_(True)  # a target frozen as a teacher gives a frozen copy; the draft is to be trained


def distillspec_config(divergence: str = "tvd", *, beta: float = 0.5, **overrides) -> DistillationConfig:
    """The :class:`~kd_plugins.DistillationConfig` of a DistillSpec run with ``divergence`` (``"kl"``,
    ``"reverse_kl"``, ``"jsd"`` with ``beta``, or ``"tvd"``, or an alias).

    Defaults: ``lmbda=1.0`` with ``on_policy_source="student"`` (every micro-batch's completions sampled from the
    draft, at ``generation_temperature=1.0``), ``temperature=1.0`` in the divergence, ``hard_label_weight=0``.
    ``**overrides`` replace any field (``lmbda=0.0``: the dataset's completions, off-policy; ``max_new_tokens``).
    For a draft cut from its target, ``on_policy_source="teacher", generation_temperature=0.0`` (the target's own
    greedy completions) measured best in benchmarks/speculative (docs/speculative.md, "Recipe for a draft cut from
    the target"); the draft's own samples help once they are plausible.
    """
    name = get_loss_spec(divergence).name  # the registry name: the fused kernel recognises it
    if name not in DISTILLSPEC_DIVERGENCES:
        raise ValueError(
            f"distillspec_config: divergence must be one of {DISTILLSPEC_DIVERGENCES} (or an alias), got "
            f"{divergence!r}; for another loss build DistillationConfig(loss_terms=..., lmbda=1.0) yourself."
        )
    recipe = {
        "loss_terms": name,
        "loss_kwargs": {"jsd": {"beta": float(beta)}} if name == "jsd" else None,
        "temperature": 1.0,
        "hard_label_weight": 0.0,
        "lmbda": 1.0,
        "on_policy_source": "student",
        "generation_temperature": 1.0,
    }
    return resolve_config(DistillationConfig, None, {**recipe, **overrides})
