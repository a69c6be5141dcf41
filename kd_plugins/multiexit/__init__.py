"""Multi-exit self-distillation: one training run yields the full model plus shallow models that work on their own.

After MoSE / ModularStarEncoder ("One Model to Train them All", arXiv 2503.03008): exits on chosen layers, a
depth-weighted task loss at every exit (``alpha_i = layer_i / L``) and distillation from the deepest exit (or an
external teacher) into the shallower ones. Then ``truncate`` exports any exit as a standalone smaller model and
the early-exit functions answer each input at the first confident exit.

::

    from kd_plugins import MultiExitCallback
    from kd_plugins.multiexit import add_exits, MultiExitConfig, truncate
    add_exits(model, layers=[2, 4, 6], head="shared")              # HF BERT/MPNet/Llama or timm ViT/ResNet
    trainer = Trainer(model=model, ..., callbacks=[MultiExitCallback(config=MultiExitConfig())])
    trainer.train()
    small = truncate(model, 2)                                      # plain PreTrainedModel, 2 layers
    small.save_pretrained("out/layer2")                             # loads with AutoModel.from_pretrained

HF ``Trainer``: :class:`kd_plugins.integrations.hf.MultiExitCallback`; timm:
:class:`kd_plugins.integrations.timm.MultiExitTask` (a ``timm.task.TrainingTask``).
"""

from .config import MultiExitConfig
from .core import (
    ExitAffine,
    ExitFFN,
    MultiExitHeads,
    add_exits,
    apply_head,
    convert_exit_heads,
    exit_embeddings,
    exit_outputs,
    get_exits,
    has_exits,
    model_family,
    num_exit_layers,
    pool,
    remove_exits,
)
from .early_exit import (
    EarlyExitResult,
    confidence,
    early_exit_classify,
    early_exit_embed,
    early_exit_generate,
    plot_accuracy_vs_depth,
    simulate_early_exit,
)
from .loss import MultiExitLoss, exit_ce_losses, exit_weights, info_nce, multi_exit_loss
from .truncate import timm_truncation_kwargs, truncate

__all__ = [
    "add_exits",
    "get_exits",
    "has_exits",
    "remove_exits",
    "exit_outputs",
    "exit_embeddings",
    "apply_head",
    "pool",
    "model_family",
    "num_exit_layers",
    "MultiExitHeads",
    "ExitAffine",
    "ExitFFN",
    "convert_exit_heads",
    "MultiExitConfig",
    "MultiExitLoss",
    "exit_weights",
    "multi_exit_loss",
    "exit_ce_losses",
    "info_nce",
    "truncate",
    "timm_truncation_kwargs",
    "EarlyExitResult",
    "confidence",
    "early_exit_classify",
    "early_exit_embed",
    "early_exit_generate",
    "simulate_early_exit",
    "plot_accuracy_vs_depth",
]


#: Framework adapters live in the integration layer (a method package never imports upward).
_MOVED = {"MultiExitCallback": "kd_plugins.integrations.hf", "MultiExitTask": "kd_plugins.integrations.timm"}


def __getattr__(name):
    if name in _MOVED:
        raise AttributeError(
            f"{name} is a framework adapter and lives in {_MOVED[name]}: "
            f"`from kd_plugins import {name}` (or `from {_MOVED[name]} import {name}`)."
        )
    raise AttributeError(f"module 'kd_plugins.multiexit' has no attribute {name!r}")
