"""kd_plugins: model compression added to the training code you already have.

Distillation for Hugging Face Trainer scripts::

    from kd_plugins import DistillationCallback, DistillationConfig
    trainer = Trainer(..., callbacks=[DistillationCallback(teacher, DistillationConfig(loss_terms="kl"))])
"""

__version__ = "0.1.0"

from .distill import DistillationConfig, DistillationEngine, inherit_student  # noqa: E402
from .losses import get_loss, list_losses, register_loss  # noqa: E402


def __getattr__(name):
    # The HF integration imports transformers.Trainer (slow); load it on first use.
    if name in ("DistillationCallback", "DistillationTrainer"):
        from .integrations import hf

        return getattr(hf, name)
    raise AttributeError(f"module 'kd_plugins' has no attribute {name!r}")


# Let `AutoModel*.from_pretrained` load kd_plugins.quant.save_quantized checkpoints: registers the W8A8 quantizer with
# transformers when transformers loads its quantizer registry (no transformers import here; see _hf_register).
from ._hf_register import install as _install_hf_quantizer  # noqa: E402

_install_hf_quantizer()

__all__ = ["__version__", "DistillationConfig", "DistillationEngine", "DistillationCallback", "DistillationTrainer",
           "inherit_student", "get_loss", "list_losses", "register_loss"]
