"""Multi-exit self-distillation: one training run yields the full model plus shallow models that work on their own.

After MoSE / ModularStarEncoder ("One Model to Train them All", arXiv 2503.03008): exits on chosen layers, a
depth-weighted task loss at every exit (``alpha_i = layer_i / L``) and distillation from the deepest exit (or an
external teacher) into the shallower ones. Then ``truncate`` exports any exit as a standalone smaller model and
the early-exit functions answer each input at the first confident exit.

::

    from kd_plugins.multiexit import add_exits, MultiExitCallback, MultiExitConfig, truncate
    add_exits(model, layers=[2, 4, 6], head="shared")              # HF BERT/MPNet/Llama or timm ViT/ResNet
    trainer = Trainer(model=model, ..., callbacks=[MultiExitCallback(MultiExitConfig())])
    trainer.train()
    small = truncate(model, 2)                                      # plain PreTrainedModel, 2 layers
    small.save_pretrained("out/layer2")                             # loads with AutoModel.from_pretrained

timm: :class:`kd_plugins.multiexit.timm_task.MultiExitTask` (a ``timm.task.TrainingTask``).
"""

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
from .loss import MultiExitConfig, MultiExitLoss, exit_ce_losses, exit_weights, info_nce, multi_exit_loss
from .truncate import timm_truncation_kwargs, truncate

__all__ = [
    "add_exits", "get_exits", "has_exits", "remove_exits", "exit_outputs", "exit_embeddings", "apply_head", "pool",
    "model_family", "num_exit_layers", "MultiExitHeads", "ExitAffine", "ExitFFN", "convert_exit_heads",
    "MultiExitConfig", "MultiExitLoss", "exit_weights", "multi_exit_loss", "exit_ce_losses", "info_nce",
    "truncate", "timm_truncation_kwargs",
    "EarlyExitResult", "confidence", "early_exit_classify", "early_exit_embed", "early_exit_generate",
    "simulate_early_exit", "plot_accuracy_vs_depth",
    "MultiExitCallback", "MultiExitTask",
]


def __getattr__(name):
    # transformers.Trainer and timm.task are slow imports: load the integrations on first use.
    if name == "MultiExitCallback":
        from .hf import MultiExitCallback

        return MultiExitCallback
    if name == "MultiExitTask":
        from .timm_task import MultiExitTask

        return MultiExitTask
    raise AttributeError(f"module 'kd_plugins.multiexit' has no attribute {name!r}")
