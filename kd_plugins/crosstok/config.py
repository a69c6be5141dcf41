"""``TokenizerTransferConfig``: the options of the tokenizer-transfer recipe (``kd_plugins.crosstok.transfer``)."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["TokenizerTransferConfig"]


@dataclass
class TokenizerTransferConfig:
    """Options of :func:`transfer_tokenizer` and of the training recipe (``train_transferred``, the CLI)."""

    copy_model: bool = field(
        default=True,
        metadata={"help": "Transfer a deep copy (the original stays untouched, to serve as the ALM teacher)."},
    )
    steps: int = field(default=100, metadata={"help": "Training steps after the initialisation (0: initialise only)."})
    learning_rate: float = field(default=1e-4, metadata={"help": "Learning rate of the training recipe (AdamW)."})
    warmup_steps: int = field(default=0, metadata={"help": "Linear warm-up steps of the learning rate."})
    batch_size: int = field(default=8, metadata={"help": "Rows per training step."})
    max_length: int = field(default=128, metadata={"help": "Tokens per training row (new tokenizer), whole words."})
    alm_weight: float = field(default=1.0, metadata={"help": "Weight of ALM against the original model (0: off)."})
    uld_weight: float = field(default=0.0, metadata={"help": "Weight of ULD against the original model (0: off)."})
    hidden_weight: float = field(
        default=0.0,
        metadata={
            "help": "Weight of chunk_hidden (0: off): the hidden states at the ends of aligned chunks matched to the "
            "original's, channel-normalised (tokenkit's alm_latents)."
        },
    )
    hidden_layers: str = field(
        default="last",
        metadata={"help": "Layers chunk_hidden matches: 'last', 'all' or hidden_states indices ('10;20;30')."},
    )
    ce_weight: float = field(
        default=1.0, metadata={"help": "Weight of the next-token cross-entropy on the text (hard_label_weight)."}
    )
    term_balance: str = field(
        default="none",
        metadata={
            "help": "'gradmag': rescale CE, ALM and ULD every step to gradient norms at the logits in the ratio of "
            "their weights (DistillationConfig.term_balance; tokenkit's recipe when ALM is combined with SFT)."
        },
    )
    train_embeddings_only: bool = field(
        default=False, metadata={"help": "Train the input / output embeddings only; the rest stays frozen."}
    )
    logging_steps: int = field(default=10, metadata={"help": "Log the losses every this many steps."})
    seed: int = field(default=0, metadata={"help": "Seed of the Trainer (data order, initialisation)."})

    def __post_init__(self):
        for name in ("steps", "warmup_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("batch_size", "logging_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {self.max_length}")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        for name in ("alm_weight", "uld_weight", "ce_weight", "hidden_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.term_balance not in ("none", "gradmag"):
            raise ValueError(f"term_balance must be 'none' or 'gradmag', got {self.term_balance!r}")
        if self.alm_weight == self.uld_weight == self.ce_weight == self.hidden_weight == 0:
            raise ValueError(
                "alm_weight, uld_weight, ce_weight and hidden_weight are all 0: nothing to train; set alm_weight=1.0."
            )
        from .teacher import _parse_hidden_layers  # a clear error now rather than at the first batch

        _parse_hidden_layers(self.hidden_layers)

    @property
    def loss_terms(self) -> str:
        """The ``DistillationConfig.loss_terms`` of the recipe (empty: cross-entropy only)."""
        weights = (("alm", self.alm_weight), ("uld", self.uld_weight), ("chunk_hidden", self.hidden_weight))
        return ",".join(f"{n}:{w:g}" for n, w in weights if w > 0)
