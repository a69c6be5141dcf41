"""``ACMConfig``: conversion and training options for Adaptive Computation Modules (parseable by HfArgumentParser)."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["ACMConfig"]

#: The values of ``ACMConfig.execution`` (the paths are in ``kd_plugins.acm.execution``).
EXECUTIONS = ("auto", "grouped", "prefix", "dense_masked", "triton")


@dataclass
class ACMConfig:
    """Options of :func:`~kd_plugins.acm.acmize` and the three training stages.

    Every field has a default, so ``HfArgumentParser((TrainingArguments, ACMConfig))`` grows ``--num_learners``,
    ``--budget`` ... on a script's command line.
    """

    # ------------------------------------------------------------------------------------------ conversion
    targets: str = field(
        default="mlp",
        metadata={
            "help": "'mlp', 'attention', 'all', or comma-separated glob "
            "patterns over module names (e.g. 'encoder.layer.[0-2].*')"
        },
    )
    num_learners: int = field(default=4, metadata={"help": "N learners per ACM"})
    init: str = field(
        default="slice",
        metadata={
            "help": "'slice' (learners = contiguous chunks of the dense "
            "block's hidden units; exact at k=N; SVD chunks for "
            "projections) or 'random' (the paper)"
        },
    )
    order: str = field(
        default="importance",
        metadata={
            "help": "with init='slice': 'importance' (sort hidden "
            "units by |activation| x ||W2 column|| first) or "
            "'original'"
        },
    )
    gate_hidden: int = field(default=16, metadata={"help": "width of the 3-layer linear gate (repo: 16)"})
    attention_rank: int = field(
        default=0,
        metadata={"help": "rank of projection learners; 0 = paper sizing round(d_in*d_out / (N*(d_in+d_out)))"},
    )
    execution: str = field(
        default="auto",
        metadata={
            "help": "how learners run for per-token k: 'auto' (prefix at inference on CPU/CUDA, the masked loop in "
            "training), 'prefix' (one GEMM pair per learner over the prefix of tokens sorted by k), 'grouped' (one "
            "GEMM pair per k group), 'dense_masked' (every learner, masked) or 'triton' (CUDA kernels, inference)"
        },
    )
    # --------------------------------------------------------------------------------------- stage 1 / 2
    detach_mode: str = field(
        default="none",
        metadata={
            "help": "stage 1 gradient routing: 'none' (full gradient "
            "through the cumulative sums) or 'detach' (repo "
            "default: learner n fits the residual of 1..n-1)"
        },
    )
    label_tau: float = field(
        default=1 / 1.2,
        metadata={"help": "stage 2 label rule threshold tau: label = min n>=label_min_k with err(n)/err(n-1) >= tau"},
    )
    label_min_k: int = field(default=2, metadata={"help": "smallest label of the rule (paper: 2)"})
    # ------------------------------------------------------------------------------------------- stage 3
    budget: float = field(default=0.5, metadata={"help": "target fraction beta of learner FLOPs"})
    alpha_budget: float = field(default=0.1, metadata={"help": "weight of the budget loss L_b"})
    alpha_entropy: float = field(default=0.05, metadata={"help": "weight of the entropy loss L_e"})
    alpha_diversity: float = field(default=0.05, metadata={"help": "weight of the diversity loss L_d"})
    gumbel_tau: float = field(default=0.8, metadata={"help": "Gumbel-softmax temperature of the gates in training"})
    gate_noise: bool = field(
        default=True,
        metadata={
            "help": "Gumbel noise on the gates in training (the paper); "
            "False: the deterministic eval choice (argmax), with "
            "the straight-through softmax gradient"
        },
    )
    straight_through: bool = field(
        default=True,
        metadata={
            "help": "weight the cumulative outputs by the "
            "straight-through one-hot so the task loss "
            "reaches the gates (the released code does not)"
        },
    )
    distill_weight: float = field(default=1.0, metadata={"help": "weight of distillation from the original model"})
    distill_loss: str = field(
        default="auto",
        metadata={
            "help": "'auto' (KL for logits, cosine of mean-pooled embeddings for bare encoders), 'kl', 'cosine', 'mse'"
        },
    )
    hidden_weight: float = field(
        default=0.0, metadata={"help": "extra MSE between last hidden states (student vs original), bare encoders"}
    )
    task_weight: float = field(default=1.0, metadata={"help": "weight of the model's own loss when labels are given"})

    def __post_init__(self):
        if self.num_learners < 1:
            raise ValueError(f"num_learners must be >= 1, got {self.num_learners}")
        if self.init not in ("slice", "random"):
            raise ValueError(f"init must be 'slice' or 'random', got {self.init!r}")
        if self.order not in ("importance", "original"):
            raise ValueError(f"order must be 'importance' or 'original', got {self.order!r}")
        if self.detach_mode not in ("none", "detach"):
            raise ValueError(f"detach_mode must be 'none' or 'detach', got {self.detach_mode!r}")
        if not 0.0 <= self.budget <= 1.0:
            raise ValueError(f"budget (target beta) must be in [0, 1], got {self.budget}")
        if self.distill_loss not in ("auto", "kl", "cosine", "mse"):
            raise ValueError(f"distill_loss must be 'auto', 'kl', 'cosine' or 'mse', got {self.distill_loss!r}")
        if self.execution not in EXECUTIONS:
            raise ValueError(
                f"execution must be one of {EXECUTIONS}, got {self.execution!r} ('auto' picks the measured fastest)"
            )
        if self.gumbel_tau <= 0:
            raise ValueError(f"gumbel_tau must be > 0, got {self.gumbel_tau}")
