"""``MoEConfig`` (sparse upcycling + router balance loss) and ``PreferenceDistillationConfig`` (DPO with the frozen
teacher as reference model), both parseable by ``HfArgumentParser``."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

__all__ = ["MoEConfig", "PreferenceDistillationConfig", "LAYER_PRESETS", "BALANCE_FORMS", "PREFERENCE_FORMS"]

#: Named layer selections (LLaVA-MoD / MoE-LLaVA ``moe_mode``: ``sparse`` = every other layer from layer 0).
LAYER_PRESETS = ("every_other", "all", "first_half", "second_half")
#: ``switch``: f_e over all top-k assignments; ``top1``: f_e over the first choice only (GShard / DeepSpeed top-2).
BALANCE_FORMS = ("switch", "top1")
ROUTER_INITS = ("normal", "zeros")
#: ``sigmoid``: DPO (the paper's formula); ``kto_pair``: what the released LLaVA-MoD script runs; ``ipo``: IPO.
PREFERENCE_FORMS = ("sigmoid", "kto_pair", "ipo")


def parse_layers(value: str) -> str | list[int]:
    """A preset name of :data:`LAYER_PRESETS`, or the layer indices of ``"0,2,5"`` / ``"[0, 2, 5]"``."""
    text = str(value).strip()
    if text in LAYER_PRESETS:
        return text
    parts = [p.strip() for p in text.strip("[]").split(",") if p.strip()]
    if not parts or not all(re.fullmatch(r"\d+", p) for p in parts):
        raise ValueError(
            f"MoEConfig.layers must be one of {LAYER_PRESETS} or comma-separated layer indices such as '0,2,5', "
            f"got {value!r}"
        )
    indices = [int(p) for p in parts]
    if len(set(indices)) != len(indices):
        raise ValueError(f"MoEConfig.layers lists a layer twice: {value!r}; name each layer once")
    return sorted(indices)


@dataclass
class MoEConfig:
    """Options of :func:`~kd_plugins.moe.upcycle_moe` and of the router balance loss.

    Every selected dense MLP becomes ``num_experts`` exact copies plus a new linear router; each token runs its
    ``top_k`` experts, weighted by the renormalised top-k router probabilities, with no capacity limit (no token is
    dropped), so the upcycled model computes exactly what the dense one did until training moves the experts apart.
    """

    num_experts: int = field(default=4, metadata={"help": "experts per MoE layer (LLaVA-MoD: 4)"})
    top_k: int = field(default=2, metadata={"help": "experts each token runs (LLaVA-MoD: 2)"})
    layers: str = field(
        default="every_other",
        metadata={
            "help": "which decoder layers get an MoE MLP: 'every_other' (0, 2, 4, ...: LLaVA-MoD's 'sparse'), "
            "'all', 'first_half', 'second_half', or comma-separated indices such as '0,2,5'"
        },
    )
    router_init: str = field(
        default="normal",
        metadata={
            "help": "'normal' (N(0, router_std^2), Mixtral-style; random but harmless routing at init) or "
            "'zeros' (uniform router probabilities at init)"
        },
    )
    router_std: float = field(default=0.02, metadata={"help": "std of the 'normal' router init"})
    router_jitter: float = field(
        default=0.0,
        metadata={
            "help": "Switch-style multiplicative jitter on the router input in training: x * U(1-eps, 1+eps); "
            "0 (default) = off"
        },
    )
    balance_weight: float = field(
        default=0.01, metadata={"help": "weight of the summed per-layer balance loss (LLaVA-MoD: 0.01); 0 = off"}
    )
    balance_form: str = field(
        default="switch",
        metadata={
            "help": "'switch': E * sum_e f_e P_e with f_e the fraction of all top-k assignments to expert e; "
            "'top1': f_e from first choices only (GShard / DeepSpeed top-2 gate). Both are 1 when balanced"
        },
    )

    def __post_init__(self):
        self.layers_spec = parse_layers(self.layers)
        if isinstance(self.num_experts, bool) or not isinstance(self.num_experts, int) or self.num_experts < 2:
            raise ValueError(f"MoEConfig.num_experts must be an integer >= 2, got {self.num_experts!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or not 1 <= self.top_k <= self.num_experts:
            raise ValueError(
                f"MoEConfig.top_k must be an integer in [1, num_experts={self.num_experts}], got {self.top_k!r}"
            )
        if self.router_init not in ROUTER_INITS:
            raise ValueError(f"MoEConfig.router_init must be one of {ROUTER_INITS}, got {self.router_init!r}")
        if not self.router_std > 0:
            raise ValueError(f"MoEConfig.router_std must be > 0, got {self.router_std!r} (e.g. 0.02)")
        if not 0 <= self.router_jitter < 1:
            raise ValueError(f"MoEConfig.router_jitter must be in [0, 1), got {self.router_jitter!r} (e.g. 0.01)")
        if not self.balance_weight >= 0:
            raise ValueError(f"MoEConfig.balance_weight must be >= 0, got {self.balance_weight!r} (e.g. 0.01)")
        if self.balance_form not in BALANCE_FORMS:
            raise ValueError(f"MoEConfig.balance_form must be one of {BALANCE_FORMS}, got {self.balance_form!r}")


@dataclass
class PreferenceDistillationConfig:
    """Options of preference distillation (LLaVA-MoD stage 2): DPO on (prompt, chosen, rejected) pairs with the
    frozen teacher as the reference model, so the student is pushed to prefer the chosen answer by a wider margin
    than the teacher does."""

    beta: float = field(default=0.1, metadata={"help": "DPO beta (LLaVA-MoD: 0.1); for 'ipo' the IPO tau"})
    loss_form: str = field(
        default="sigmoid",
        metadata={"help": "'sigmoid' (DPO, the paper's formula), 'kto_pair' (the released LLaVA-MoD script) or 'ipo'"},
    )
    label_smoothing: float = field(
        default=0.0, metadata={"help": "conservative DPO label smoothing in [0, 0.5) ('sigmoid' only)"}
    )
    average_logprobs: bool = field(
        default=False,
        metadata={"help": "use the mean instead of the sum of completion-token log-probs (length-normalised DPO)"},
    )
    sft_weight: float = field(
        default=0.0,
        metadata={"help": "weight of an added NLL term on the chosen completions (per token); 0 = off (LLaVA-MoD)"},
    )

    def __post_init__(self):
        if not self.beta > 0:
            raise ValueError(f"PreferenceDistillationConfig.beta must be > 0, got {self.beta!r} (e.g. 0.1)")
        if self.loss_form not in PREFERENCE_FORMS:
            raise ValueError(
                f"PreferenceDistillationConfig.loss_form must be one of {PREFERENCE_FORMS}, got {self.loss_form!r}"
            )
        if not 0 <= self.label_smoothing < 0.5:
            raise ValueError(
                f"PreferenceDistillationConfig.label_smoothing must be in [0, 0.5), got {self.label_smoothing!r}"
            )
        if self.label_smoothing and self.loss_form != "sigmoid":
            raise ValueError(
                f"PreferenceDistillationConfig.label_smoothing applies to loss_form='sigmoid' only, got "
                f"loss_form={self.loss_form!r}; set label_smoothing=0"
            )
        if not self.sft_weight >= 0:
            raise ValueError(f"PreferenceDistillationConfig.sft_weight must be >= 0, got {self.sft_weight!r}")
