"""Speculative decoding: how well a draft model serves its target.

* :func:`expected_acceptance`: the analytic per-token acceptance ``sum_v min(p_v, q_v) = 1 - TVD(p, q)`` (or the
  greedy argmax agreement) averaged over given token batches (DistillSpec, Zhou et al. 2024).
* :func:`measure_speculative`: Hugging Face assisted generation with the accepted draft tokens counted per round,
  timed against the target alone, and checked lossless under greedy decoding.
* ``DraftEvalCallback`` (in :mod:`kd_plugins.integrations.hf`) logs the acceptance of the model being trained, as a
  draft, during ``Trainer`` training.
* :func:`build_draft` / :func:`distillspec_config`: a draft cut from its target and the DistillSpec recipe (on-policy
  distillation through ``DistillationCallback``); :func:`train_draft_online`: SpecVLM-style online distillation from
  the target's logits and features collected while it generates.
* :func:`restrict_draft_vocab` / :func:`frequent_token_ids`: a draft served with its LM head cut to the frequent
  tokens (FR-Spec), cheaper per drafted token.
* :func:`use_few_row_gemm`: linear layers whose few-row products (a verification forward, a large head's decode
  step) take the GEMM layout a CPU BLAS runs fast.

The divergences a draft is distilled with (forward / reverse KL, generalised JSD, TVD) are in
:mod:`kd_plugins.losses` (``"kl"``, ``"reverse_kl"``, ``"jsd"``, ``"tvd"``). See ``docs/speculative.md``.
"""

from .acceptance import AcceptanceResult, expected_acceptance, expected_tokens_per_round, token_acceptance
from .config import SpeculativeConfig
from .drafts import DISTILLSPEC_DIVERGENCES, build_draft, distillspec_config
from .few_row_gemm import FewRowLinear, restore_linear, use_few_row_gemm
from .frequent_vocab import SubsetLMHead, frequent_token_ids, restrict_draft_vocab
from .hook import AcceptanceRecorder, GenerationRounds, record_acceptance
from .measure import SpeculativeReport, measure_speculative
from .online import (
    OnlineDraftLoss,
    OnlineDraftRun,
    TargetOutputs,
    collect_target_outputs,
    online_draft_loss,
    train_draft_online,
)
from .vocab import check_same_vocabulary

__all__ = [
    "SpeculativeConfig",
    "AcceptanceResult",
    "token_acceptance",
    "expected_acceptance",
    "expected_tokens_per_round",
    "SpeculativeReport",
    "measure_speculative",
    "AcceptanceRecorder",
    "GenerationRounds",
    "record_acceptance",
    "check_same_vocabulary",
    "DISTILLSPEC_DIVERGENCES",
    "build_draft",
    "distillspec_config",
    "SubsetLMHead",
    "frequent_token_ids",
    "restrict_draft_vocab",
    "FewRowLinear",
    "use_few_row_gemm",
    "restore_linear",
    "TargetOutputs",
    "OnlineDraftLoss",
    "OnlineDraftRun",
    "collect_target_outputs",
    "online_draft_loss",
    "train_draft_online",
]
