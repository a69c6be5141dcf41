"""``DistillationConfig``: one dataclass describing a distillation objective, parseable by ``HfArgumentParser``."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from .._config import parse_mapping, resolve_config
from ..losses.registry import get_loss_spec

TASKS = ("auto", "causal_lm", "masked_lm", "seq_classification", "token_classification", "seq2seq", "encoder")
VOCAB_ALIGNMENTS = ("error", "truncate", "pad")
POOLINGS = ("mean", "cls")
TEACHER_DTYPES = (None, "float32", "float16", "bfloat16", "float64")
#: ``teacher_quantization`` values (kd_plugins/distill/teacher_quant.py says what each does and why).
TEACHER_QUANTIZATIONS = (None, "int8", "nf4")
TERM_BALANCES = ("none", "gradmag")
ON_POLICY_SOURCES = ("student", "teacher", "student_or_teacher")
#: ``loss_terms`` left unset: chosen by the student's task when the engine is set up (the one INFO line it logs says
#: which). Students with logits (LMs, classifiers) get forward KL. Bare encoders have no logits and get the cosine
#: distance of the pooled sentence embeddings: it is scale-free (teacher and student embedding norms differ widely,
#: which makes an MSE's size depend on the pair), it scores what sentence embeddings are used for (cosine
#: similarity), and it works through the learned projector when the widths differ.
AUTO_LOSS_TERMS = {"logits": "kl", "encoder": "embedding_cosine"}


@dataclass
class DistillationConfig:
    """What to distil and how.

    The total training loss is ``hard_label_weight * task_loss + sum_i weight_i * loss_i`` where the ``loss_i``
    are the registered losses named in ``loss_terms`` (see :func:`kd_plugins.losses.list_losses`). Logit losses
    compare the student's and the teacher's output logits at the positions that carry a label (all non-padding
    positions when there are no labels); ``embedding`` losses compare pooled sentence embeddings (bare encoders);
    ``hidden`` losses compare the outputs of the module pairs in ``feature_pairs``; ``attention`` losses compare
    attention maps of the layers in ``attention_layer_map``.

    ``loss_terms=None`` (the default) lets the student decide: ``kl`` for students with logits (causal / masked LMs,
    sequence and token classifiers, seq2seq), ``embedding_cosine`` for bare encoders (``task="encoder"``, e.g.
    ``BertModel``); see :data:`AUTO_LOSS_TERMS`. Until the engine knows the student, such a config holds ``kl`` and
    ``auto_loss_terms`` is ``True``; :meth:`for_task` gives the resolved config. An empty ``loss_terms=""`` means no
    distillation term (then ``hard_label_weight`` or ``feature_pairs`` must give something to optimise).

    Every field is a plain type so ``HfArgumentParser((TrainingArguments, DistillationConfig))`` can parse it from
    the command line; dict-valued fields accept JSON or ``key:value,...`` strings.
    """

    teacher_model_name_or_path: str | None = field(
        default=None, metadata={"help": "Teacher checkpoint to load when the teacher is not passed as a module."}
    )
    loss_terms: dict | str | None = field(
        default=None,
        metadata={
            "help": "Loss terms and weights: 'kl', 'kl:1.0,hidden_mse:0.5' or JSON. Unset: chosen by the student, "
            "'kl' when it has logits, 'embedding_cosine' for a bare encoder."
        },
    )
    loss_kwargs: dict | str | None = field(
        default=None, metadata={"help": 'Per-term hyper-parameters as JSON, e.g. \'{"jsd": {"beta": 0.5}}\'.'}
    )
    temperature: float = field(default=1.0, metadata={"help": "Softmax temperature of the logit losses."})
    hard_label_weight: float = field(
        default=0.0, metadata={"help": "Weight of the model's own task loss (needs labels when > 0)."}
    )
    feature_pairs: dict | str | None = field(
        default=None,
        metadata={
            "help": "Student->teacher module names whose outputs are matched, "
            "'encoder.layer.1=encoder.layer.3,...' or JSON."
        },
    )
    feature_loss: str = field(
        default="mse",
        metadata={"help": "Hidden-state loss for feature_pairs when loss_terms names none: 'mse' or 'cosine'."},
    )
    feature_weight: float = field(default=1.0, metadata={"help": "Weight of that default feature loss."})
    feature_projector: bool = field(
        default=True, metadata={"help": "Learn a linear projector when student/teacher feature widths differ."}
    )
    attention_layer_map: dict | str | None = field(
        default=None, metadata={"help": "Student->teacher layer indices for attention losses, e.g. '2=5'."}
    )
    pooling: str = field(default="mean", metadata={"help": "Sentence pooling for embedding losses: mean | cls."})
    task: str = field(default="auto", metadata={"help": f"Student task, one of {TASKS}; auto-detected by default."})
    vocab_alignment: str = field(
        default="error",
        metadata={
            "help": "When vocab sizes differ: error | truncate (drop the extra columns) | "
            "pad (append -inf columns to the smaller)."
        },
    )
    teacher_device: str | None = field(
        default=None,
        metadata={
            "help": "None: the teacher must already sit on the student's device; 'student': "
            "move it there; or an explicit device such as 'cuda:1'."
        },
    )
    teacher_dtype: str | None = field(default=None, metadata={"help": "Cast the teacher: float32|bfloat16|..."})
    teacher_quantization: str | None = field(
        default=None,
        metadata={
            "help": "Quantize the teacher's linear layers to save memory: 'int8' (kd_plugins' W8A8, per-token "
            "activations, no extra package) or 'nf4' (bitsandbytes 4-bit, `pip install bitsandbytes`). Unset: as given."
        },
    )
    projector_lr: float | None = field(
        default=None,
        metadata={
            "help": "Learning rate of projectors (default: the Trainer's current lr). A projector starts random: "
            "at a fine-tuning lr it can stay near its start for the whole run, so try e.g. 1e-2."
        },
    )
    log_agreement: bool = field(default=True, metadata={"help": "Log teacher-student top-1 agreement."})
    fused_loss: bool | None = field(
        default=None,
        metadata={
            "help": "Causal LMs: compute the logit loss with the chunked fused linear+KD "
            "kernel (never materialises [tokens x vocab] logits). None = on where safe."
        },
    )
    fused_chunk_size: int = field(default=1024, metadata={"help": "Token chunk size of the fused loss."})
    term_balance: str = field(
        default="none",
        metadata={
            "help": "'none': the weighted sum as configured. 'gradmag': each term (and the task loss) is rescaled "
            "every step so that its gradient at the student's logits has norm weight_i * mean (the configured "
            "weights then set the terms' gradient shares; tokenkit's approx_gradmag_preserve_mag, taken at the "
            "logits). Terms that do not reach the logits keep their weights. Needs materialised logits (no fused loss)."
        },
    )
    cross_tokenizer_options: dict | str | None = field(
        default=None,
        metadata={
            "help": "Options of the cross-tokenizer teacher (terms 'alm' / 'uld'), e.g. "
            "'on_round_trip_error=skip_row,max_teacher_length=2048' or JSON; keys: max_teacher_length, "
            "uld_positions (one_to_one | chunk_start), on_round_trip_error (raise | skip_row), check_coverage, "
            "hidden_layers, chat (true: rows are conversations in the student's chat template; the teacher reads "
            "them in its own)."
        },
    )
    # On-policy data (GKD / DistillSpec, sequence-level KD): kd_plugins/distill/onpolicy.py
    lmbda: float = field(
        default=0.0,
        metadata={
            "help": "Causal LMs: probability per training micro-batch of replacing its completions by ones generated "
            "from its prompts (0: the dataset's completions; 1: always generated, fully on-policy)."
        },
    )
    on_policy_source: str = field(
        default="student",
        metadata={
            "help": "Who generates with lmbda > 0: 'student' (on-policy GKD / DistillSpec) or 'teacher' "
            "(sequence-level KD), each with probability lmbda (else the dataset's completion); 'student_or_teacher': "
            "every micro-batch is generated, by the student with probability lmbda, else by the teacher (TRL "
            "GKDTrainer's seq_kd=True)."
        },
    )
    generation_temperature: float = field(
        default=1.0, metadata={"help": "Sampling temperature of the generated completions (0: greedy)."}
    )
    generation_top_p: float = field(
        default=1.0, metadata={"help": "Nucleus top-p of the generated completions (1: the full distribution)."}
    )
    max_new_tokens: int = field(
        default=64, metadata={"help": "Longest generated completion (it ends at its first EOS, which is kept)."}
    )
    on_policy_seed: int | None = field(
        default=None,
        metadata={"help": "Seed of the on-policy draws and of generation (None: the Trainer's seed)."},
    )

    def __post_init__(self):
        # What the user wrote, for kd_plugins._config.resolve_config (overrides re-derive the implicit terms).
        self._init_args = {f.name: getattr(self, f.name) for f in fields(self) if f.init}
        self.auto_loss_terms = self.loss_terms is None
        terms = parse_mapping(AUTO_LOSS_TERMS["logits"] if self.auto_loss_terms else self.loss_terms, "loss_terms")
        kwargs = parse_mapping(self.loss_kwargs, "loss_kwargs", str)
        for k, v in kwargs.items():
            if not isinstance(v, dict):
                raise ValueError(f"loss_kwargs[{k!r}] must be a dict of hyper-parameters, got {v!r}")
        pairs = {str(k): str(v) for k, v in parse_mapping(self.feature_pairs, "feature_pairs", str).items()}
        attn = {int(k): int(v) for k, v in parse_mapping(self.attention_layer_map, "attention_layer_map", str).items()}
        self.kinds = {}
        for name, w in terms.items():
            spec = get_loss_spec(name)  # raises with close matches on unknown names
            if not isinstance(w, (int, float)) or w < 0:
                raise ValueError(f"loss_terms[{name!r}] weight must be a number >= 0, got {w!r}")
            self.kinds[name] = spec.kind
        for name in kwargs:
            if name not in terms:
                raise ValueError(f"loss_kwargs names {name!r}, which is not in loss_terms {sorted(terms)}")
        if pairs and not any(k == "hidden" for k in self.kinds.values()):
            if self.feature_loss not in ("mse", "cosine"):
                raise ValueError(f"feature_loss must be 'mse' or 'cosine', got {self.feature_loss!r}")
            terms[f"hidden_{self.feature_loss}"] = float(self.feature_weight)
            self.kinds[f"hidden_{self.feature_loss}"] = "hidden"
        if any(k == "hidden" for k in self.kinds.values()) and not pairs:
            raise ValueError(
                "A hidden-state loss is in loss_terms but feature_pairs is empty; name the module pairs "
                "to match, e.g. feature_pairs={'model.layers.3': 'model.layers.11'}."
            )
        if any(k == "attention" for k in self.kinds.values()) and not attn:
            raise ValueError("An attention loss is in loss_terms but attention_layer_map is empty, e.g. {2: 5}.")
        if any(k == "ranking" for k in self.kinds.values()):
            raise ValueError(
                "Ranking losses take candidate lists, not model outputs; use them from "
                "kd_plugins.losses in your own compute_loss (see the ranking recipes)."
            )
        if not terms and self.hard_label_weight <= 0:
            raise ValueError("Nothing to optimise: loss_terms is empty and hard_label_weight is 0.")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.hard_label_weight < 0:
            raise ValueError(f"hard_label_weight must be >= 0, got {self.hard_label_weight}")
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        if self.vocab_alignment not in VOCAB_ALIGNMENTS:
            raise ValueError(f"vocab_alignment must be one of {VOCAB_ALIGNMENTS}, got {self.vocab_alignment!r}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if self.teacher_dtype not in TEACHER_DTYPES:
            raise ValueError(f"teacher_dtype must be one of {TEACHER_DTYPES}, got {self.teacher_dtype!r}")
        if self.teacher_quantization not in TEACHER_QUANTIZATIONS:
            raise ValueError(
                f"teacher_quantization must be one of {TEACHER_QUANTIZATIONS}, got {self.teacher_quantization!r}; "
                "use 'int8' (no extra package) or 'nf4' (bitsandbytes), or leave it unset."
            )
        if self.fused_chunk_size <= 0:
            raise ValueError(f"fused_chunk_size must be > 0, got {self.fused_chunk_size}")
        if self.term_balance not in TERM_BALANCES:
            raise ValueError(f"term_balance must be one of {TERM_BALANCES}, got {self.term_balance!r}")
        if self.term_balance != "none" and self.fused_loss:
            raise ValueError(
                f"term_balance={self.term_balance!r} measures each term's gradient at the student's logits, which the "
                "fused loss never materialises; set fused_loss=None (the callback then uses the plain path) or False."
            )
        self.loss_terms, self.loss_kwargs, self.feature_pairs, self.attention_layer_map = terms, kwargs, pairs, attn
        # Checked against the terms and the CrossTokenizerTeacher's options by the engine (distill/cross_tokenizer.py).
        self.cross_tokenizer_options = parse_mapping(self.cross_tokenizer_options, "cross_tokenizer_options", str)
        self._check_on_policy()

    def _check_on_policy(self) -> None:
        if not 0.0 <= self.lmbda <= 1.0:
            raise ValueError(
                f"lmbda must lie in [0, 1] (the probability that a micro-batch's completions are generated), "
                f"got {self.lmbda}"
            )
        if self.on_policy_source not in ON_POLICY_SOURCES:
            raise ValueError(f"on_policy_source must be one of {ON_POLICY_SOURCES}, got {self.on_policy_source!r}")
        if self.on_policy_source == "student_or_teacher" and self.lmbda == 0:
            raise ValueError(
                "on_policy_source='student_or_teacher' with lmbda=0 is off: lmbda is the student's share of the "
                "generated micro-batches (the teacher generates the rest); set lmbda in (0, 1], or use "
                "on_policy_source='teacher', lmbda=1 for the teacher alone."
            )
        if self.generation_temperature < 0:
            raise ValueError(f"generation_temperature must be >= 0 (0: greedy), got {self.generation_temperature}")
        if not 0.0 < self.generation_top_p <= 1.0:
            raise ValueError(f"generation_top_p must lie in (0, 1] (1: no nucleus cut), got {self.generation_top_p}")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if self.on_policy_seed is not None and (not isinstance(self.on_policy_seed, int) or self.on_policy_seed < 0):
            raise ValueError(f"on_policy_seed must be None or an integer >= 0, got {self.on_policy_seed!r}")
        if self.lmbda > 0 and self.task not in ("auto", "causal_lm"):
            raise ValueError(
                f"lmbda={self.lmbda} generates completions, which needs a causal-LM student; task is {self.task!r}. "
                "Set lmbda=0 or task='causal_lm'."
            )
        crosstok = sorted(n for n, k in self.kinds.items() if k == "cross_tokenizer")
        if self.lmbda > 0 and crosstok:
            raise ValueError(
                f"lmbda={self.lmbda} (on-policy generation) with the cross-tokenizer terms {crosstok} is not supported:"
                " generated token ids need not re-tokenize into the same text for the teacher. Use lmbda=0 with "
                "cross-tokenizer terms, or a same-tokenizer teacher with on-policy data."
            )

    def for_task(self, task: str) -> DistillationConfig:
        """This config with unset ``loss_terms`` resolved for a student of ``task`` (a value of :data:`TASKS` other
        than ``auto``): itself unless the terms were left unset and the student is a bare encoder, then a copy whose
        logit default is replaced by :data:`AUTO_LOSS_TERMS` ``["encoder"]``. The config is not modified."""
        if not self.auto_loss_terms or task != "encoder":
            return self
        return resolve_config(DistillationConfig, self, {"loss_terms": AUTO_LOSS_TERMS["encoder"]})

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("kinds", None)
        if self.auto_loss_terms:  # still to be chosen by the student: keep it so
            d["loss_terms"] = None
        return d
