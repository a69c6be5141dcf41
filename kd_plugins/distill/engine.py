"""``DistillationEngine``: the one distillation core.

The engine owns the teacher (a :class:`~kd_plugins.distill.teacher.Teacher`: device, dtype, eval mode, no_grad,
tokenizer checks), the loss terms, their normalisation (:class:`~kd_plugins.distill.scaling.LossScaling`), the
learned projectors (:class:`~kd_plugins.distill.projectors.ProjectorBank`) and the fused linear+KD path
(:class:`~kd_plugins.distill.fused.FusedLogitLoss`). Adapters (the HF callbacks and Trainer subclass, the timm tasks,
ACM stage 3, multi-exit) give it the student's batch and outputs and add the returned loss to their task loss.

Extension points (see ``docs/conventions.md``):

* a new **term**: register a loss with :func:`kd_plugins.losses.register_loss` under a ``kind`` (``logits``,
  ``embedding``, ``hidden``, ``attention``); name it in ``DistillationConfig.loss_terms`` and the engine computes it
  with the matching inputs;
* a new **teacher source** (a cache of teacher outputs, a teacher with another tokenizer): compute the teacher
  outputs yourself and pass them as ``compute(..., teacher_outputs=...)``, or subclass and override
  :meth:`DistillationEngine.teacher_forward`; a :class:`~kd_plugins.distill.cache.TeacherCache` is accepted in place
  of the teacher module (its outputs are looked up per batch, see ``distill/cache.py``);
* a new **data source** (generated completions, another batch): the adapter builds the batch it hands to
  :meth:`DistillationEngine.compute`; nothing in the engine assumes where it came from.
"""

from __future__ import annotations

import difflib
import inspect
import logging
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._utils import model_device, unwrap_model
from ..losses import get_loss, get_loss_spec
from ..losses._common import valid_mask
from ..losses.feature import mean_pool
from .cache import TeacherCache
from .config import DistillationConfig
from .cross_tokenizer import CROSS_TOKENIZER, CrossTokenizerTerms
from .pairs import split_pairs
from .projectors import STATE_FILE, ProjectorBank
from .retokenize import retokenize
from .scaling import LossScaling
from .teacher import Teacher
from .teacher_set import TeacherSet, TeacherSetEmbeddings, TeacherSetOutputs
from .terms import weighted_sum

logger = logging.getLogger(__name__)
_SEQUENCE_LEVEL_TASKS = ("seq_classification", "encoder")
#: Constructor-only hyper-parameters of the feature loss modules (their functional forms do not take them).
_FEATURE_CTOR_KEYS = ("student_dim", "teacher_dim", "projector")


def detect_task(model: nn.Module) -> str:
    """Guess the student task from the model class (override with ``DistillationConfig.task``)."""
    m = unwrap_model(model)
    if hasattr(m, "get_base_model"):  # peft
        m = m.get_base_model()
    name = type(m).__name__
    cfg = getattr(m, "config", None)
    if getattr(cfg, "is_encoder_decoder", False):
        return "seq2seq"
    for suffix, task in (
        ("ForCausalLM", "causal_lm"),
        ("LMHeadModel", "causal_lm"),
        ("ForMaskedLM", "masked_lm"),
        ("ForSequenceClassification", "seq_classification"),
        ("ForImageClassification", "seq_classification"),
        ("ForTokenClassification", "token_classification"),
    ):
        if name.endswith(suffix):
            return task
    if name.endswith("Model"):
        return "encoder"
    raise ValueError(
        f"Cannot infer the task of {name}; set DistillationConfig.task to one of "
        "causal_lm, masked_lm, seq_classification, token_classification, seq2seq, encoder."
    )


def _log_auto_terms(student: nn.Module, task: str, config: DistillationConfig) -> None:
    if task == "encoder":
        what = f"is a bare encoder, so its pooled ({config.pooling}) sentence embeddings are distilled"
    else:
        what = f"has logits (task {task}), so they are distilled at temperature {config.temperature}"
    logger.info(
        "kd_plugins: DistillationConfig.loss_terms not set: %s %s with %s; set loss_terms to choose the terms",
        type(student).__name__,
        what,
        ", ".join(f"{n}:{w:g}" for n, w in config.loss_terms.items()),
    )


def _first_tensor(out: Any) -> torch.Tensor:
    if torch.is_tensor(out):
        return out
    if isinstance(out, (tuple, list)) and out and torch.is_tensor(out[0]):
        return out[0]
    if isinstance(out, dict):
        for key in ("last_hidden_state", "hidden_states", "logits"):
            if torch.is_tensor(out.get(key)):
                return out[key]
    raise TypeError(f"Cannot take a feature tensor from a module output of type {type(out).__name__}")


class FeatureRecorder:
    """Forward hooks that keep the latest output of named modules."""

    def __init__(self, model: nn.Module, names: list[str], role: str):
        self.outputs: dict[str, torch.Tensor] = {}
        self.handles = []
        modules = dict(model.named_modules())
        for name in names:
            if name not in modules:
                close = difflib.get_close_matches(name, list(modules), n=5, cutoff=0.5)
                raise ValueError(
                    f"feature_pairs: the {role} has no module named {name!r}. "
                    + (f"Close matches: {', '.join(close)}. " if close else "")
                    + f"List names with [n for n, _ in {role}.named_modules()]."
                )
            self.handles.append(modules[name].register_forward_hook(self._hook(name)))

    def _hook(self, name):
        def fn(module, args, output):
            self.outputs[name] = _first_tensor(output)

        return fn

    def pop(self, name: str) -> torch.Tensor:
        if name not in self.outputs:
            raise RuntimeError(f"feature module {name!r} did not run in the last forward pass")
        return self.outputs.pop(name)

    def remove(self):
        for h in self.handles:
            h.remove()
        self.handles.clear()
        self.outputs.clear()


@dataclass
class KDResult:
    """What :meth:`DistillationEngine.compute` returns."""

    loss: torch.Tensor  # weighted sum of the distillation terms, normalised like the task loss
    terms: dict[str, torch.Tensor] = field(default_factory=dict)  # per-term means over this batch (for logs)
    metrics: dict[str, float] = field(default_factory=dict)  # agreement etc.
    values: dict[str, torch.Tensor] = field(default_factory=dict)  # unweighted normalised terms (with gradients)


@dataclass
class _Terms:
    """Terms gathered by the per-kind helpers: values for the loss (normalised) and for the logs (batch means)."""

    for_loss: dict[str, torch.Tensor] = field(default_factory=dict)
    for_log: dict[str, torch.Tensor] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)

    def add(self, name: str, value_for_loss: torch.Tensor, value_for_log: torch.Tensor) -> None:
        self.for_loss[name] = value_for_loss
        self.for_log[name] = value_for_log.detach()


class DistillationEngine:
    """Teacher + loss terms + normalisation + projectors for one student.

    Args:
        teacher: the teacher model (frozen here: ``requires_grad_(False)``, ``eval()`` before every forward), or a
            :class:`~kd_plugins.distill.cache.TeacherCache` of its outputs (looked up per batch; no teacher runs),
            or a :class:`~kd_plugins.distill.teacher_set.TeacherSet` of several teachers (per-row weights, mixture
            or sum of divergences; :attr:`teacher` is then its first teacher).
        config: a :class:`DistillationConfig`.
        teacher_tokenizer / student_tokenizer: optional; when both are given they are compared. Different
            tokenizers are only accepted for sequence-level objectives (pooled embeddings, sequence
            classification), where the student's text is re-tokenised for the teacher, and for the cross-tokenizer
            terms ``alm`` / ``uld`` of causal LMs (which need both; see ``distill/cross_tokenizer.py``).
    """

    def __init__(
        self,
        teacher: nn.Module | TeacherCache | TeacherSet,
        config: DistillationConfig | None = None,
        *,
        teacher_tokenizer=None,
        student_tokenizer=None,
    ):
        self.config = config or DistillationConfig()
        self.cache = teacher if isinstance(teacher, TeacherCache) else None
        self.teacher_set = teacher if isinstance(teacher, TeacherSet) else None  # several teachers: teacher_set.py
        self.runner = None  # a cache runs no teacher (the fused path reads its top-k rows: distill/fused.py)
        if self.teacher_set is not None:  # the set's first teacher takes the single-teacher checks and hooks
            self.config = self.teacher_set.fit_config(self.config)
            self.runner = self.teacher_set.bind(self.config)
        elif self.cache is None:
            self.runner = Teacher(
                teacher,
                device=self.config.teacher_device,
                dtype=self.config.teacher_dtype,
                quantization=self.config.teacher_quantization,
            )
        self._given_config = self.config  # unset loss_terms are resolved from it at every setup
        self.teacher_tokenizer = teacher_tokenizer
        self.student_tokenizer = student_tokenizer
        self.retokenize = False
        self.crosstok: CrossTokenizerTerms | None = None  # teacher source of the alm / uld terms (setup)
        self.losses: dict[str, nn.Module] = {}
        self.bank = ProjectorBank(enabled=self.config.feature_projector, lr=self.config.projector_lr)
        self._student_rec: FeatureRecorder | None = None
        self._teacher_rec: FeatureRecorder | None = None
        self.task: str | None = None
        self.student: nn.Module | None = None
        self.step = 0

    @property
    def teacher(self) -> nn.Module | None:
        """The frozen teacher module (``None`` when the engine reads a :class:`TeacherCache`)."""
        return self.runner.module if self.runner is not None else None

    @property
    def teacher_device(self) -> torch.device:
        if self.runner is None:
            return model_device(self.student) if self.student is not None else torch.device("cpu")
        return self.runner.device

    @property
    def projectors(self) -> nn.ModuleDict:
        """The learned projectors (outside the student), keyed by term and module."""
        return self.bank.modules

    # ------------------------------------------------------------------ setup
    def needs_setup(self, student: nn.Module) -> bool:
        """Whether :meth:`setup` has not run for ``student`` yet (or its feature hooks were removed)."""
        return self.student is not unwrap_model(student) or bool(
            self.config.feature_pairs and self._student_rec is None
        )

    def set_student_tokenizer(self, tokenizer) -> None:
        """The student's tokenizer (compared with the teacher's at setup), unless one was given already."""
        if self.student_tokenizer is None and tokenizer is not None:
            self.student_tokenizer = getattr(tokenizer, "tokenizer", tokenizer)

    def setup(self, student: nn.Module) -> None:
        """Validate the pair and install hooks. Call once the student sits on its training device.

        Unset ``loss_terms`` are chosen here from the student's task (``kl`` with logits, ``embedding_cosine`` for a
        bare encoder; one INFO log line says which) and :attr:`config` becomes the resolved config."""
        student = unwrap_model(student)
        if self.runner is not None:
            self.runner.check_separate(student)
        self.student = student
        given = self._given_config
        self.task = given.task if given.task != "auto" else detect_task(student)
        self.config = cfg = given.for_task(self.task)
        if given.auto_loss_terms:
            _log_auto_terms(student, self.task, cfg)
        self._check_kinds_fit_task(student)
        self.crosstok = CrossTokenizerTerms.for_engine(self)  # None without cross-tokenizer terms; checks the pair
        if self.cache is not None:
            self._build_losses()
            return self.cache.check_fits(self.task, cfg, _student_vocab(student, self.task))
        self.runner.place(student)
        self._check_tokenizers()
        self._check_vocab(student)
        if self.teacher_set is not None:
            self.teacher_set.setup(self, student)
        self._build_losses()
        if any(k == "attention" for k in cfg.kinds.values()):
            _check_no_attention_dropout(student)
        if "dkd" in self.losses and self.task in ("encoder",):
            raise ValueError("DKD needs class logits and labels")
        if cfg.feature_pairs:
            self.remove_hooks()
            self._student_rec = FeatureRecorder(student, list(cfg.feature_pairs), "student")
            self._teacher_rec = FeatureRecorder(self.teacher, list(cfg.feature_pairs.values()), "teacher")

    def _check_kinds_fit_task(self, student: nn.Module) -> None:
        kinds = self.config.kinds.values()
        if self.task != "encoder" and any(k == "pair" for k in kinds):
            raise ValueError(
                f"Pair terms ({self._names('pair')}) compare pooled sentence embeddings of a bare encoder; "
                f"{type(student).__name__} is a {self.task!r} model. Use task='encoder' with an AutoModel student."
            )
        if self.task == "encoder" and any(k == "logits" for k in kinds):
            raise ValueError(
                f"{type(student).__name__} is a bare encoder (no logits); use embedding losses "
                "(embedding_mse, embedding_cosine, affinity_kl, ...) or hidden-state losses."
            )
        if self.task != "encoder" and any(k == "embedding" for k in kinds) and self.config.task == "auto":
            raise ValueError(
                f"Embedding losses pool last_hidden_state, which {type(student).__name__} does not "
                "return; set task='encoder' and pass the bare encoder, or use logit losses."
            )

    def _build_losses(self) -> None:
        """One module per term; logit terms sum over rows (the engine normalises them, see ``LossScaling``)."""
        cfg = self.config
        for name, kind in cfg.kinds.items():
            kw = dict(cfg.loss_kwargs.get(name, {}))
            if kind == "logits":
                kw.setdefault("temperature", cfg.temperature)
                if "reduction" in inspect.signature(get_loss_spec(name).module_cls.__init__).parameters:
                    kw["reduction"] = "sum"
            self.losses[name] = get_loss(name, **kw)

    def remove_hooks(self) -> None:
        for rec in (self._student_rec, self._teacher_rec):
            if rec is not None:
                rec.remove()
        self._student_rec = self._teacher_rec = None

    def _check_tokenizers(self) -> None:
        if self.crosstok is not None:  # alm / uld terms: CrossTokenizerTerms.for_engine checked the pair
            return
        tt, st = self.teacher_tokenizer, self.student_tokenizer
        if tt is None or st is None or not hasattr(tt, "get_vocab") or not hasattr(st, "get_vocab"):
            return
        tv, sv = tt.get_vocab(), st.get_vocab()
        if tv == sv:
            return
        differing = len(set(tv.items()) ^ set(sv.items()))
        kinds = self.config.kinds.values()
        if (
            self.task in _SEQUENCE_LEVEL_TASKS
            and all(k in ("embedding", "logits") for k in kinds)
            and not self.config.feature_pairs
        ):
            # Sequence-level targets do not need aligned tokens: decode the student's text and re-tokenise it.
            self.retokenize = True
            return
        raise ValueError(
            f"Teacher and student tokenizers differ ({len(tv)} vs {len(sv)} tokens, {differing} entries differ). "
            "Token-level distillation (logits per token, hidden states, attention maps) needs the same tokenizer: "
            "use a teacher/student pair that shares one, or distil sequence-level targets only (pooled embeddings "
            "or sequence-classification logits, for which the text is re-tokenised for the teacher). Causal LMs "
            "with different tokenizers: use the cross-tokenizer terms 'alm' / 'uld' (loss_terms='alm')."
        )

    def _check_vocab(self, student: nn.Module) -> None:
        if not any(k == "logits" for k in self.config.kinds.values()):
            return
        s_cfg, t_cfg = getattr(student, "config", None), getattr(self.teacher, "config", None)
        key = "num_labels" if self.task in ("seq_classification", "token_classification") else "vocab_size"
        sv, tv = getattr(s_cfg, key, None), getattr(t_cfg, key, None)
        if sv is None or tv is None or sv == tv:
            return
        if key == "num_labels":
            raise ValueError(
                f"Student has {sv} labels but the teacher has {tv}; logit distillation needs the same "
                "label set (same order). Re-head the student or map the classes first."
            )
        if self.config.vocab_alignment == "error":
            raise ValueError(
                f"Student vocab_size {sv} differs from teacher vocab_size {tv}. If they share a tokenizer and only "
                "the embedding matrices are padded differently, set DistillationConfig(vocab_alignment='truncate') "
                "(compare the shared first min(V) entries) or 'pad'; if the tokenizers differ, logit distillation "
                "is not defined token by token: use loss_terms='alm' / 'uld' with teacher_tokenizer=... ."
            )

    # --------------------------------------------------------------- teacher
    def teacher_forward(self, inputs: dict, *, need_attentions: bool = False, extra: dict | None = None) -> Any:
        """Run the frozen teacher on the student's batch (no grad, eval mode re-asserted, on its device); with a
        :class:`TeacherCache`, look the batch up: ``{"pooled_embedding": ...}`` or ``{"teacher_topk": ...}``."""
        if self.cache is not None:
            return self.cache.lookup(inputs, device=model_device(self.student))
        if self.teacher_set is not None and not self.teacher_set.runs_as_single:
            return self.teacher_set.forward(self, inputs, need_attentions=need_attentions, extra=extra)
        if self.crosstok is not None:  # re-tokenized for the teacher, chunks aligned (kd_plugins.crosstok)
            return self.crosstok.teacher_outputs(inputs)
        if self.retokenize:
            enc = retokenize(
                self.student_tokenizer, self.teacher_tokenizer, inputs["input_ids"], inputs.get("attention_mask")
            )
            tin = self.runner.model_inputs(enc)
        else:
            keep = ("labels",) if self.task == "seq2seq" else ()  # the decoder inputs are derived from the labels
            tin = self.runner.model_inputs(inputs, keep=keep)
        if need_attentions:
            tin["output_attentions"] = True
        tin.update(extra or {})
        out = self.runner.run(lambda m: m(**tin))
        if self.retokenize:
            out["_kd_attention_mask"] = tin.get("attention_mask")
        return out

    # ------------------------------------------------------------- projectors
    def projector_step(self, lr: float | None = None, grad_scale: float | None = None) -> None:
        """All-reduce projector grads across ranks (they are outside DDP), step and zero them."""
        self.bank.step(lr=lr, grad_scale=grad_scale)

    def save(self, directory: str) -> str | None:
        """Write projector (+ optimizer) state beside a checkpoint, atomically. Returns the path or None."""
        return self.bank.save(directory)

    def load(self, directory: str) -> bool:
        """Queue projector state from ``directory`` (applied when each projector is created). Returns found."""
        return self.bank.load(directory)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Projector weights and their optimizer state, flattened for safetensors."""
        return self.bank.state_dict()

    # ------------------------------------------------------------ the loss
    def compute(
        self,
        inputs: dict,
        student_outputs: Any,
        *,
        scaling: LossScaling | None = None,
        teacher_outputs: Any = None,
        positive_outputs: Any = None,
        kinds: set[str] | None = None,
        step: int | None = None,
    ) -> KDResult:
        """Distillation terms for one batch, summed with their weights and normalised by ``scaling``.

        ``teacher_outputs``: precomputed teacher outputs (otherwise the teacher runs here). ``kinds`` restricts the
        computed terms to those loss kinds (e.g. ``{"hidden"}`` beside a fused logit loss). A pair batch (``positive_*``
        inputs, see :mod:`kd_plugins.distill.pairs`) needs ``positive_outputs``, the student's outputs on the
        positives: the embedding terms then cover anchors and positives, the ``pair`` terms the pairs.
        """
        if self.task is None:
            raise RuntimeError("DistillationEngine.setup(student) must be called before compute()")
        if step is not None:
            self.step = step
        scaling = scaling or LossScaling()
        want = {k for k in self.config.kinds.values() if kinds is None or k in kinds}
        anchors, positives = split_pairs(inputs)
        self._check_pair_batch(positives, positive_outputs, want)
        t_out = (
            teacher_outputs
            if teacher_outputs is not None
            else self.teacher_forward(anchors, need_attentions="attention" in want)
        )
        terms = _Terms()
        if "logits" in want:
            self._logit_terms(terms, anchors, student_outputs, t_out, scaling)
        if want & {"embedding", "pair"}:
            emb = self._pooled_pair(anchors, student_outputs, t_out)
            if positives is not None:
                emb = (emb, self._pooled_pair(positives, positive_outputs, self.teacher_forward(positives)))
            self._embedding_terms(terms, emb, scaling)
        if "hidden" in want:
            self._hidden_terms(terms, anchors, scaling)
        if "attention" in want:
            self._attention_terms(terms, anchors, student_outputs, t_out, scaling)
        if CROSS_TOKENIZER in want:
            self._cross_tokenizer_terms(terms, anchors, student_outputs, t_out, scaling)
        loss = weighted_sum(terms.for_loss, self.config.loss_terms, step=self.step)
        if loss is None:
            loss = torch.zeros((), device=model_device(self.student))
        return KDResult(loss=loss, terms=terms.for_log, metrics=terms.metrics, values=terms.for_loss)

    def _check_pair_batch(self, positives, positive_outputs, want: set[str]) -> None:
        if positives is None:
            if "pair" in want:
                raise ValueError(
                    f"The pair terms {self._names('pair')} need pair batches (anchor and 'positive_*' inputs per row); "
                    "collate (anchor, positive) examples with kd_plugins.PairCollator."
                )
            return
        if positive_outputs is None:
            raise ValueError(
                "This batch has 'positive_*' inputs: pass the student's outputs on them as "
                "compute(..., positive_outputs=...) (DistillationCallback does)."
            )
        other = sorted(n for n, k in self.config.kinds.items() if k not in ("embedding", "pair"))
        if other or self.task != "encoder":
            raise ValueError(
                f"Pair batches are for bare encoders with embedding / pair terms; the terms {other} (task "
                f"{self.task!r}) cannot use the 'positive_*' group. Drop those terms or use ordinary batches."
            )

    def _cross_tokenizer_terms(self, terms: _Terms, inputs, s_out, t_out, scaling: LossScaling) -> None:
        """ALM / ULD against a teacher with another tokenizer (``distill/cross_tokenizer.py``): chunk sums per label
        token, normalised like the task loss."""
        if self.crosstok is None:
            raise RuntimeError("cross-tokenizer terms need setup() with the teacher's and the student's tokenizers")
        self.crosstok.add_terms(terms, inputs, s_out, t_out, scaling)

    def _names(self, kind: str) -> list[str]:
        return [n for n, k in self.config.kinds.items() if k == kind]

    def _logit_terms(self, terms: _Terms, inputs, s_out, t_out, scaling: LossScaling) -> None:
        if isinstance(t_out, TeacherSetOutputs):  # several teachers: their mixture or sum of divergences
            return self.teacher_set.logit_terms(self, terms, inputs, s_out, t_out, scaling)
        s_logits, t_logits, labels, mask = self._aligned_logits(
            s_out, t_out, inputs.get("labels"), inputs.get("attention_mask")
        )
        count = _count_rows(s_logits, labels, mask)
        topk = t_logits if isinstance(t_logits, tuple) else None  # (indices, log_probs) from a sparse teacher
        for name in self._names("logits"):
            loss_mod = self.losses[name]
            if topk is not None:
                value = loss_mod(s_logits, None, labels=labels, mask=mask, teacher_topk=topk)
            else:
                value = loss_mod(s_logits, t_logits, labels=labels, mask=mask)
            if getattr(loss_mod, "reduction", None) == "sum":
                mean = value / max(count, 1)
                terms.add(name, scaling.token_sum(value, count) if labels is not None else scaling.mean(mean), mean)
            else:  # a loss without a sum reduction returns its own batch mean
                terms.add(name, scaling.mean(value), value)
        if self.config.log_agreement and s_logits.numel():
            valid = _valid_rows(s_logits, labels, mask)
            t_top = topk[0][..., 0] if topk is not None else t_logits.argmax(-1)  # top-k comes sorted
            agree = (s_logits.argmax(-1) == t_top.to(s_logits.device))[valid]
            if agree.numel():
                terms.metrics["agreement"] = float(agree.float().mean())

    def _pooled_pair(self, inputs: dict, s_out: Any, t_out: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Pooled ``(student, teacher)`` embeddings ``[B, D_s]``, ``[B, D_t]`` of one batch (or pair group)."""
        if isinstance(t_out, TeacherSetOutputs):  # several teachers: each one's embeddings on its rows
            return self.teacher_set.pooled_pairs(self, inputs, s_out, t_out)
        attn_mask = inputs.get("attention_mask")
        s_emb = self._pool(s_out, attn_mask)
        if isinstance(t_out, dict) and "pooled_embedding" in t_out:  # a teacher cache (or any precomputed source)
            return s_emb, t_out["pooled_embedding"].to(s_emb.device)
        t_mask = t_out.get("_kd_attention_mask") if isinstance(t_out, dict) and self.retokenize else attn_mask
        return s_emb, self._pool(t_out, t_mask).to(s_emb.device)

    def _embedding_terms(self, terms: _Terms, emb, scaling: LossScaling) -> None:
        """``emb``: ``(student, teacher)`` pooled embeddings, or ``((s_anchor, t_anchor), (s_positive, t_positive))``
        for a pair batch: embedding terms over all its texts, pair terms over its pairs."""
        if isinstance(emb, TeacherSetEmbeddings) or isinstance(emb[0], TeacherSetEmbeddings):  # several teachers
            return self.teacher_set.embedding_terms(self, terms, emb, scaling)
        pairs = emb if isinstance(emb[0], tuple) else None
        if pairs is not None:
            s_emb, t_emb = (torch.cat([pairs[0][i], pairs[1][i]]) for i in (0, 1))
        else:
            s_emb, t_emb = emb
        for name in self._names("embedding"):
            mod = self.losses[name]
            proj = None
            if getattr(mod, "needs_width", True):
                proj = self.bank.get(f"embedding.{name}", s_emb.shape[-1], t_emb.shape[-1], s_emb.device)
            value = mod(proj(s_emb) if proj is not None else s_emb, t_emb)
            terms.add(name, scaling.mean(value), value)
        for name in self._names("pair"):
            (sa, ta), (sp, tp) = pairs
            value = self.losses[name](sa, sp, teacher_anchor=ta, teacher_positive=tp)
            terms.add(name, scaling.mean(value), value)
        if self.config.log_agreement and s_emb.shape[-1] == t_emb.shape[-1]:
            terms.metrics["teacher_cosine"] = float(
                F.cosine_similarity(s_emb.detach().float(), t_emb.float(), -1).mean()
            )

    def _hidden_terms(self, terms: _Terms, inputs, scaling: LossScaling) -> None:
        attn_mask = inputs.get("attention_mask")
        device = model_device(self.student)
        feats = [
            (s_name, self._student_rec.pop(s_name), self._teacher_rec.pop(t_name).to(device))
            for s_name, t_name in self.config.feature_pairs.items()
        ]
        for name in self._names("hidden"):
            fn = get_loss_spec(name).function
            kw = {k: v for k, v in self.config.loss_kwargs.get(name, {}).items() if k not in _FEATURE_CTOR_KEYS}
            vals = []
            for s_name, sh, th in feats:
                proj = self.bank.get(f"{name}.{s_name}", sh.shape[-1], th.shape[-1], sh.device)
                mask = (
                    attn_mask if (attn_mask is not None and sh.dim() == 3 and sh.shape[:2] == attn_mask.shape) else None
                )
                vals.append(fn(sh, th, mask=mask, projector=proj, **kw))
            value = torch.stack(vals).mean()
            terms.add(name, scaling.mean(value), value)

    def _attention_terms(self, terms: _Terms, inputs, s_out, t_out, scaling: LossScaling) -> None:
        s_att, t_att = getattr(s_out, "attentions", None), getattr(t_out, "attentions", None)
        if not s_att or not t_att:
            raise ValueError(
                "Attention losses need attention maps: load both models with "
                "attn_implementation='eager' (SDPA/flash attention return no maps)."
            )
        attn_mask = inputs.get("attention_mask")
        for name in self._names("attention"):
            vals = [
                self.losses[name](s_att[si], t_att[ti].to(s_att[si].device), attention_mask=attn_mask)
                for si, ti in self.config.attention_layer_map.items()
            ]
            value = torch.stack(vals).mean()
            terms.add(name, scaling.mean(value), value)

    def _pool(self, outputs: Any, attention_mask) -> torch.Tensor:
        hidden = (
            outputs["last_hidden_state"]
            if isinstance(outputs, dict) and "last_hidden_state" in outputs
            else getattr(outputs, "last_hidden_state", None)
        )
        if hidden is None:
            raise ValueError(
                "Embedding losses need last_hidden_state in the model outputs (a bare encoder such as "
                "AutoModel); this model returned " + ", ".join(getattr(outputs, "keys", lambda: [])())
            )
        if self.config.pooling == "cls":
            return hidden[:, 0]
        return mean_pool(hidden, attention_mask.to(hidden.device) if attention_mask is not None else None)

    def _aligned_logits(self, s_out, t_out, labels, attn_mask):
        """Student and teacher logits at the same rows, with the labels and mask that select valid rows. A sparse
        teacher (``t_out["teacher_topk"]``) comes back as the pair ``(indices, log_probs)`` in place of logits."""
        s = s_out["logits"] if isinstance(s_out, dict) else s_out[1]
        from_cache = isinstance(t_out, dict) and ("teacher_topk" in t_out or t_out.get("cache_rows", False))
        if isinstance(t_out, dict) and "teacher_topk" in t_out:
            t = tuple(x.to(s.device) for x in t_out["teacher_topk"])
            t_rows = t[0].shape[:-1]
        else:
            t = t_out["logits"].to(s.device)
            t_rows = t.shape[:-1]
        if s.shape[:-1] != t_rows:
            raise ValueError(
                f"Student logits {tuple(s.shape)} and teacher outputs with rows {tuple(t_rows)} cover different "
                "positions; both models must see the same tokens."
            )
        if not isinstance(t, tuple) and s.shape[-1] != t.shape[-1]:
            s, t = self._align_vocab(s, t)
        mask = None
        if self.task == "causal_lm":
            s = s[:, :-1]
            t = tuple(x[:, :-1] for x in t) if isinstance(t, tuple) else t[:, :-1]
            if labels is not None:
                labels = labels[:, 1:]
            if attn_mask is not None:
                mask = attn_mask[:, 1:]
                if from_cache:  # a cache holds no teacher row at a (left-)padded position: skip those
                    mask = mask * attn_mask[:, :-1]
        elif s.dim() == 3 and attn_mask is not None and self.task != "seq2seq":
            mask = attn_mask
        if self.config.hard_label_weight > 0 and labels is None:
            raise ValueError(
                "hard_label_weight > 0 but the batch has no labels; add labels (e.g. "
                "DataCollatorForLanguageModeling(mlm=False)) or set hard_label_weight=0."
            )
        if "dkd" in self.losses and labels is None:
            raise ValueError("DKD needs labels (target classes) in the batch.")
        if self.task == "seq_classification":
            mask = None
            if labels is not None and labels.dim() != 1:  # multi-label / regression targets are not class ids
                labels = None
        return s, t, labels, mask

    def _align_vocab(self, s, t):
        mode = self.config.vocab_alignment
        vs, vt = s.shape[-1], t.shape[-1]
        if mode == "error":
            raise ValueError(
                f"Student logits have {vs} entries per row, teacher logits {vt}. Set "
                "DistillationConfig(vocab_alignment='truncate' or 'pad') when the tokenizers are the "
                "same and only the padded vocabulary sizes differ."
            )
        if mode == "truncate":
            v = min(vs, vt)
            return s[..., :v], t[..., :v]
        v = max(vs, vt)
        return (F.pad(s, (0, v - vs), value=float("-inf")), F.pad(t, (0, v - vt), value=float("-inf")))


def _student_vocab(student: nn.Module, task: str) -> int | None:
    key = "num_labels" if task in ("seq_classification", "token_classification") else "vocab_size"
    return getattr(getattr(student, "config", None), key, None)


def _check_no_attention_dropout(student: nn.Module) -> None:
    for key in ("attention_probs_dropout_prob", "attention_dropout"):
        p = getattr(getattr(student, "config", None), key, 0.0) or 0.0
        if p > 0:
            raise ValueError(
                f"Attention losses need the student's attention maps, but Hugging Face models return them "
                f"after dropout ({key}={p}), which would distil randomly zeroed maps. Load the student with "
                f"{key}=0.0 (e.g. from_pretrained(..., {key}=0.0))."
            )


def _valid_rows(logits: torch.Tensor, labels: torch.Tensor | None, mask: torch.Tensor | None) -> torch.Tensor:
    return valid_mask(logits.shape[:-1], labels=labels, mask=mask, device=logits.device)


def _count_rows(logits, labels, mask) -> int:
    return int(_valid_rows(logits, labels, mask).sum())


__all__ = [
    "DistillationEngine",
    "KDResult",
    "FeatureRecorder",
    "detect_task",
    "unwrap_model",
    "model_device",
    "STATE_FILE",
]
