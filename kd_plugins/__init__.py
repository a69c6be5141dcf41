"""kd_plugins: model compression added to the training code you already have.

Distillation for Hugging Face Trainer scripts::

    from kd_plugins import DistillationCallback, DistillationConfig
    trainer = Trainer(..., callbacks=[DistillationCallback(teacher, DistillationConfig(loss_terms="kl"))])

Every public entry point is reachable from here; the framework adapters (which import ``transformers.Trainer`` or
``timm.task``, slow imports) load on first use.
"""

__version__ = "0.1.0"

import importlib as _importlib

from .distill import DistillationConfig, DistillationEngine, bistil_config, inherit_student, regular_layer_map  # noqa: E402
from .losses import get_loss, list_losses, register_loss  # noqa: E402

#: Public name -> module that defines it, imported on first attribute access.
_LAZY = {
    "DistillationCallback": "kd_plugins.integrations.hf",
    "DistillationTrainer": "kd_plugins.integrations.hf",
    "ACMCallback": "kd_plugins.integrations.hf",
    "MultiExitCallback": "kd_plugins.integrations.hf",
    "KDTask": "kd_plugins.integrations.timm",
    "ACMTask": "kd_plugins.integrations.timm",
    "MultiExitTask": "kd_plugins.integrations.timm",
    "quantize": "kd_plugins.quant",
    "QuantConfig": "kd_plugins.quant",
    "save_quantized": "kd_plugins.quant",
    "load_quantized": "kd_plugins.quant",
    "acmize": "kd_plugins.acm",
    "ACMConfig": "kd_plugins.acm",
    "save_acm": "kd_plugins.acm",
    "load_acm": "kd_plugins.acm",
    "set_acm_execution": "kd_plugins.acm",
    "add_exits": "kd_plugins.multiexit",
    "MultiExitConfig": "kd_plugins.multiexit",
    "truncate": "kd_plugins.multiexit",
    "SkillPack": "kd_plugins.skillpack",
    "SkillPackConfig": "kd_plugins.skillpack",
    "save_skillpack": "kd_plugins.skillpack",
    "load_skillpack": "kd_plugins.skillpack",
    "fused_linear_kd_loss": "kd_plugins.kernels",
    "TeacherCache": "kd_plugins.distill",
    "PairCollator": "kd_plugins.distill",
    "TopicAwareBatches": "kd_plugins.distill",
    "build_teacher_cache": "kd_plugins.distill",
    "save_teacher_cache": "kd_plugins.distill",
    "load_teacher_cache": "kd_plugins.distill",
    "cache_teacher": "kd_plugins.distill.offline_cache",
    "read_cache_data": "kd_plugins.distill.offline_cache",
    "TeacherSet": "kd_plugins.distill",
    "score_teachers": "kd_plugins.distill",
    "score_teachers_per_class": "kd_plugins.distill",
    "MSTConfig": "kd_plugins.distill.mst",
    "MSTTeacherSet": "kd_plugins.distill.mst",
    "SpecialisedTeacher": "kd_plugins.distill.mst",
    "train_masks": "kd_plugins.distill.mst",
    "shard_teacher": "kd_plugins.distill.sharded_teacher",
    "quantize_teacher": "kd_plugins.distill.teacher_quant",
    "CrossTokenizerTeacher": "kd_plugins.crosstok",
    "cross_tokenizer_loss": "kd_plugins.crosstok",
    "align_text": "kd_plugins.crosstok",
    "transfer_tokenizer": "kd_plugins.crosstok",
    "TokenizerTransferConfig": "kd_plugins.crosstok",
    "train_transferred": "kd_plugins.integrations.hf.tokenizer_transfer",
    "SparseFTCallback": "kd_plugins.integrations.hf",
    "lottery_ticket_sparse_finetune": "kd_plugins.integrations.hf",
    "SparseDiff": "kd_plugins.sparseft",
    "SparseFTConfig": "kd_plugins.sparseft",
    "save_sparse_diff": "kd_plugins.sparseft",
    "load_sparse_diff": "kd_plugins.sparseft",
    "SpeculativeConfig": "kd_plugins.speculative",
    "expected_acceptance": "kd_plugins.speculative",
    "measure_speculative": "kd_plugins.speculative",
    "DraftEvalCallback": "kd_plugins.integrations.hf",
    "build_draft": "kd_plugins.speculative",
    "distillspec_config": "kd_plugins.speculative",
    "restrict_draft_vocab": "kd_plugins.speculative",
    "frequent_token_ids": "kd_plugins.speculative",
    "use_few_row_gemm": "kd_plugins.speculative",
    "upcycle_moe": "kd_plugins.moe",
    "MoEConfig": "kd_plugins.moe",
    "save_moe": "kd_plugins.moe",
    "load_moe": "kd_plugins.moe",
    "moe_balance_loss": "kd_plugins.moe",
    "expert_load": "kd_plugins.moe",
    "PreferenceDistillationConfig": "kd_plugins.moe",
    "MoEBalanceCallback": "kd_plugins.integrations.hf",
    "PreferenceDistillationCallback": "kd_plugins.integrations.hf",
    "WADWeights": "kd_plugins.distill.wad",
    "wad_weights": "kd_plugins.distill.wad",
    "wad_loss": "kd_plugins.distill.wad",
    "weighted_distillation_loss": "kd_plugins.losses.weighted",
    "WADConfig": "kd_plugins.distill.wad_config",
    "wad_weights_from_teacher": "kd_plugins.distill.wad_batch",
    "WADCallback": "kd_plugins.integrations.hf",
    "WADTask": "kd_plugins.integrations.timm.wad",
    "WADDataset": "kd_plugins.integrations.timm.wad",
    "ProCKDTask": "kd_plugins.integrations.timm",
    "ProCKDConfig": "kd_plugins.vision.prockd",
    "HADConfig": "kd_plugins.distill.had_config",
    "HADCollator": "kd_plugins.distill.had",
    "grouped_mask": "kd_plugins.distill.had",
    "had_feature_loss": "kd_plugins.distill.had",
    "visible_feature_loss": "kd_plugins.distill.had",
    "HADCallback": "kd_plugins.integrations.hf",
}


def __getattr__(name):
    if name in _LAZY:
        value = getattr(_importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'kd_plugins' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


# Let `AutoModel*.from_pretrained` load kd_plugins.quant.save_quantized checkpoints: registers the W8A8 quantizer with
# transformers when transformers loads its quantizer registry (no transformers import here; see _hf_register).
from ._hf_register import install as _install_hf_quantizer  # noqa: E402


def _register_hf_quantizer() -> bool:
    from .quant.hf_quantizer import register

    return register()


_install_hf_quantizer(_register_hf_quantizer)

__all__ = [
    "__version__",
    "DistillationConfig",
    "DistillationEngine",
    "inherit_student",
    "bistil_config",
    "regular_layer_map",
    "get_loss",
    "list_losses",
    "register_loss",
    *_LAZY,
]
