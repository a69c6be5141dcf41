"""``TeacherSet``: several teachers distilled into one student, as one teacher source.

A :class:`TeacherSet` goes wherever a teacher module goes (``DistillationEngine``, ``DistillationCallback``,
``DistillationTrainer``). Each row of a batch gets a weight per teacher, from one of

* ``weights``: a fixed list (normalised to sum 1), the same for every row (default: uniform);
* ``router``: a callable ``router(inputs) -> [B, K]`` tensor of non-negative weights (rows normalised to sum 1);
* ``teacher_column``: a batch column naming one teacher per row (an index, or a name of ``teachers`` given as a
  dict), i.e. one-hot weights: per-row routing by dataset metadata;
* ``class_relevance``: per-class relevance scores (:meth:`TeacherSet.class_weighted`): each row's weights follow
  the classes a reference teacher predicts for it (classification tasks: one ``[C]`` prediction per row).

A teacher runs only on the rows where its weight is non-zero. Two aggregations (they are different objectives):

* ``"mixture"``: the teachers' probabilities at the loss temperature ``T`` are mixed,
  ``log p_mix = logsumexp_i(log w_i + log p_i)`` with ``p_i = softmax(z_i / T)``, and ``p_mix`` is the one teacher
  of the logit terms (handed to them as the logits ``T * log p_mix``, whose softmax at ``T`` is ``p_mix``);
* ``"sum_of_divergences"``: each teacher gets its own divergence, ``sum_i w_i D(p_i, q)``, per row.

The divergence is convex in the teacher distribution for the KL family, so the mixture gives a loss no larger than
the sum of divergences; they agree when one teacher covers a row (routing), and always for a single teacher.

A set with one teacher runs the engine's single-teacher path itself, so it gives exactly (bit for bit) the
single-teacher result. With several teachers the logit terms and the pooled-embedding terms are supported (the
latter as ``(1/B) sum_rows sum_i w_i D(head_i(s), t_i)`` with one learned projector ``head_i`` per teacher, whatever
the aggregation); hidden-state, attention, pair and cross-tokenizer terms raise at setup. All teachers must share
one vocabulary (label set) and tokenizer with the student.

``offload=True`` parks the teachers on CPU and moves each to the student's device only for its rows (and back),
for when the teachers do not fit beside the student.

:meth:`TeacherSet.nearest` and :meth:`TeacherSet.weighted` build the DistillNearest / DistillWeighted sets of Borup,
Phoo and Hariharan ("Distilling from Similar Tasks for Transfer Learning on a Budget", ICCV 2023) from relevance
scores (see :func:`kd_plugins.distill.teacher_scores.score_teachers`); :meth:`TeacherSet.class_weighted` is our
per-class extension of DistillWeighted (see its docstring).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from .._config import resolve_config
from .._utils import model_device
from ..losses import get_loss, get_loss_spec
from ..losses._common import valid_mask
from .config import DistillationConfig
from .teacher import Teacher

__all__ = [
    "TeacherSet",
    "ClassRelevance",
    "TeacherSetOutputs",
    "TeacherSetEmbeddings",
    "split_routing_columns",
    "check_set_terms",
    "row_loss",
    "AGGREGATIONS",
]

AGGREGATIONS = ("mixture", "sum_of_divergences")
#: Logit terms that compare raw logits (not distributions): a mixture of probabilities has no raw logits.
_RAW_LOGIT_TERMS = ("logit_mse",)
_NON_LOGIT_HINT = (
    "With several teachers only logit terms and pooled-embedding terms are supported (hidden-state, attention, pair "
    "and cross-tokenizer terms are not); distil those from one teacher (e.g. TeacherSet.nearest(teachers, scores))."
)


@dataclass(frozen=True)
class ClassRelevance:
    """Per-class DistillWeighted: row weights from per-class relevance scores and a reference teacher's prediction.

    For a row ``x`` with the reference teacher's class probabilities ``p_ref(c | x)`` (at temperature 1), teacher
    ``i`` gets ``w_i(x) = softmax_i(sum_c p_ref(c | x) S[i, c] / tau)``: its expected relevance over the classes the
    row probably belongs to. ``S`` ``[K, C]`` comes from :func:`~kd_plugins.distill.teacher_scores.
    score_teachers_per_class` (default: each teacher's accuracy on the labelled examples of each class).

    Attributes:
        scores: ``[K, C]`` float64 relevance of teacher ``i`` for class ``c`` (higher is better).
        tau: softmax temperature (> 0; ``inf`` gives uniform weights).
        reference: index of the teacher whose prediction places each row among the classes.
    """

    scores: torch.Tensor
    tau: float
    reference: int

    def weights(self, reference_logits: torch.Tensor) -> torch.Tensor:
        """``[B, K]`` float32 row weights from the reference teacher's ``[B, C]`` logits."""
        k, c = self.scores.shape
        if reference_logits.dim() != 2 or reference_logits.shape[-1] != c:
            raise ValueError(
                f"A class-weighted TeacherSet reads one [B, {c}] class prediction per row from its reference teacher, "
                f"which returned logits of shape {tuple(reference_logits.shape)}. Per-class weights apply to "
                "classification tasks whose label set the scores were computed on; for token-level tasks use "
                "TeacherSet.weighted (one weight per teacher) or a router."
            )
        p = torch.softmax(reference_logits.detach().double().cpu(), -1)
        return torch.softmax(p @ self.scores.T / self.tau, -1).float()


@dataclass
class TeacherSetOutputs:
    """Per-teacher outputs of one batch, for the ``sum_of_divergences`` aggregation.

    ``weights``: ``[B, K]`` row weights (rows sum to 1); ``per_teacher``: ``(k, rows, outputs)`` for each teacher
    that ran, ``rows`` the batch indices it ran on and ``outputs`` its model outputs on those rows."""

    weights: torch.Tensor
    per_teacher: list[tuple[int, torch.Tensor, Any]]


@dataclass
class TeacherSetEmbeddings:
    """Pooled embeddings of one batch with several teachers: the student's ``[B, D_s]`` and, per teacher,
    ``(k, rows, [n_k, D_k])``; ``weights`` as in :class:`TeacherSetOutputs`."""

    student: torch.Tensor
    per_teacher: list[tuple[int, torch.Tensor, torch.Tensor]]
    weights: torch.Tensor


class TeacherSet:
    """Several frozen teachers used as one teacher source (see the module docstring for the objectives).

    Args:
        teachers: a list of teacher modules, or a dict ``name -> module`` (names are what ``teacher_column`` may
            hold; a list's teachers are named ``"0"``, ``"1"``, ...).
        weights: fixed non-negative weights, one per teacher (normalised to sum 1). Default: uniform.
        router: ``router(inputs) -> [B, K]`` non-negative per-row weights (each row normalised to sum 1).
        teacher_column: the batch key that names each row's teacher (an int index or a teacher name). With the HF
            Trainer set ``remove_unused_columns=False`` so the column reaches the batch; names (strings) need a
            collator that keeps them as a list (:meth:`collator` wraps one).
        class_relevance: per-class relevance (:class:`ClassRelevance`, built by :meth:`class_weighted`).
        aggregation: ``"mixture"`` (mix the teachers' probabilities) or ``"sum_of_divergences"``.
        offload: park the teachers on CPU and move each to the student's device only for its rows.

    At most one of ``weights``, ``router``, ``teacher_column`` and ``class_relevance`` may be given.
    """

    def __init__(
        self,
        teachers: Sequence[nn.Module] | Mapping[str, nn.Module],
        weights: Sequence[float] | torch.Tensor | None = None,
        *,
        router: Callable[[dict], torch.Tensor] | None = None,
        teacher_column: str | None = None,
        class_relevance: ClassRelevance | None = None,
        aggregation: str = "mixture",
        offload: bool = False,
    ):
        if isinstance(teachers, Mapping):
            self.names, self.modules = [str(n) for n in teachers], list(teachers.values())
        else:
            self.modules = list(teachers)
            self.names = [str(i) for i in range(len(self.modules))]
        if not self.modules:
            raise ValueError("TeacherSet needs at least one teacher; got an empty collection.")
        for name, m in zip(self.names, self.modules):
            if not isinstance(m, nn.Module):
                raise TypeError(f"TeacherSet: teacher {name!r} must be an nn.Module, got {type(m).__name__}")
        given = [
            n
            for n, v in (
                ("weights", weights),
                ("router", router),
                ("teacher_column", teacher_column),
                ("class_relevance", class_relevance),
            )
            if v is not None
        ]
        if len(given) > 1:
            raise ValueError(
                f"TeacherSet takes one of weights, router, teacher_column and class_relevance; got {', '.join(given)}. "
                "Each decides every row's weights alone."
            )
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"TeacherSet aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
        if router is not None and not callable(router):
            raise TypeError(f"TeacherSet router must be callable (inputs -> [B, K] weights), got {type(router)}")
        self.weights = _normalised_weights(weights, len(self.modules)) if weights is not None else None
        self.router, self.teacher_column = router, teacher_column
        self.class_relevance = _checked_relevance(class_relevance, len(self.modules))
        self.aggregation, self.offload = aggregation, bool(offload)
        self.runners: list[Teacher] = []
        self._row_losses: dict[str, nn.Module] = {}

    def __len__(self) -> int:
        return len(self.modules)

    def __repr__(self) -> str:
        how = (
            "weights"
            if self.weights is not None
            else "router"
            if self.router
            else "class relevance"
            if self.class_relevance is not None
            else self.teacher_column or "uniform"
        )
        return (
            f"TeacherSet({', '.join(self.names)}; rows weighted by {how}; aggregation={self.aggregation}; "
            f"offload={self.offload})"
        )

    @property
    def runs_as_single(self) -> bool:
        """One resident teacher and no routing column: the engine runs its own single-teacher path (bit for bit the
        same result)."""
        return len(self.modules) == 1 and not self.offload and self.teacher_column is None

    # ------------------------------------------------------------------ DistillNearest / DistillWeighted
    @classmethod
    def nearest(
        cls, teachers: Sequence[nn.Module] | Mapping[str, nn.Module], scores: Sequence[float] | Mapping[str, float]
    ) -> TeacherSet:
        """DistillNearest: a set holding only the teacher with the highest relevance score (first on ties), so it
        distils exactly like that single teacher."""
        names, modules = _named(teachers)
        values = _score_list(scores, names)
        best = max(range(len(values)), key=lambda i: (values[i], -i))
        return cls({names[best]: modules[best]})

    @classmethod
    def weighted(
        cls,
        teachers: Sequence[nn.Module] | Mapping[str, nn.Module],
        scores: Sequence[float] | Mapping[str, float],
        tau: float = 1.0,
        **kwargs: Any,
    ) -> TeacherSet:
        """DistillWeighted: every teacher weighted by ``softmax(score / tau)``. ``tau -> 0`` gives the nearest
        teacher's one-hot weights, ``tau = inf`` uniform weights. ``kwargs``: ``aggregation``, ``offload``."""
        names, modules = _named(teachers)
        return cls(dict(zip(names, modules)), softmax_weights(_score_list(scores, names), tau), **kwargs)

    @classmethod
    def class_weighted(
        cls,
        teachers: Sequence[nn.Module] | Mapping[str, nn.Module],
        class_scores: torch.Tensor | Sequence[Sequence[float]],
        tau: float = 0.1,
        reference: int | str | None = None,
        **kwargs: Any,
    ) -> TeacherSet:
        """Per-class DistillWeighted (our extension): each row weights teacher ``i`` by
        ``softmax_i(sum_c p_ref(c | x) S[i, c] / tau)`` (:class:`ClassRelevance`).

        A global weight cannot use a teacher that is excellent on some classes and wrong on the others (a
        specialist); per-class scores can, with the row's class placed by a reference teacher. Args:
        ``class_scores`` ``[K, C]`` (:func:`~kd_plugins.distill.teacher_scores.score_teachers_per_class`);
        ``tau``: accuracy-like scores in [0, 1] separate well at 0.05-0.2; ``reference``: the teacher (index or
        name) that predicts each row's class, default the one with the best mean score; ``kwargs``:
        ``aggregation``, ``offload``.
        """
        names, modules = _named(teachers)
        scores = torch.as_tensor(class_scores, dtype=torch.float64)
        if scores.dim() != 2 or scores.shape[0] != len(modules):
            raise ValueError(
                f"class_scores must be [teachers, classes] = [{len(modules)}, C], got {tuple(scores.shape)}; "
                "score_teachers_per_class(teachers, labelled_data) returns that shape."
            )
        if reference is None:
            mean = scores.mean(1).tolist()
            ref = max(range(len(mean)), key=lambda i: (mean[i], -i))
        elif isinstance(reference, str):
            if reference not in names:
                raise ValueError(f"reference {reference!r} is not one of the teachers {', '.join(names)}")
            ref = names.index(reference)
        else:
            ref = int(reference)
        relevance = ClassRelevance(scores, float(tau), ref)
        return cls(dict(zip(names, modules)), class_relevance=relevance, **kwargs)

    # ------------------------------------------------------------------ row weights
    def row_weights(self, inputs: dict, batch_size: int) -> torch.Tensor:
        """``[B, K]`` float32 weights of this batch's rows (each row sums to 1)."""
        if self.class_relevance is not None:
            raise ValueError(
                "A class-weighted TeacherSet's row weights come from its reference teacher's outputs: use "
                "weights_and_reference(inputs, batch_size, run_member)."
            )
        k = len(self.modules)
        if self.teacher_column is not None:
            index = self._routed_index(inputs, batch_size)
            return torch.nn.functional.one_hot(index, k).float()
        if self.router is not None:
            return self._router_weights(inputs, batch_size)
        w = self.weights if self.weights is not None else torch.full((k,), 1.0 / k)
        return w.float().unsqueeze(0).expand(batch_size, k)

    def weights_and_reference(
        self,
        inputs: dict,
        batch_size: int,
        run_member: Callable[[int], Any],
        logits_of: Callable[[Any], torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, dict[int, Any]]:
        """``([B, K] row weights, {member index: outputs already computed on all rows})``. A class-weighted set runs
        its reference member first (``run_member(k)``, all rows) and derives the weights from its logits; the other
        modes compute the weights from the inputs and run nothing."""
        rel = self.class_relevance
        if rel is None:
            return self.row_weights(inputs, batch_size), {}
        out = run_member(rel.reference)
        return rel.weights((logits_of or _logits_of)(out)), {rel.reference: out}

    def _routed_index(self, inputs: dict, batch_size: int) -> torch.Tensor:
        col = self.teacher_column
        if col not in inputs:
            raise ValueError(
                f"TeacherSet routes rows by the batch column {col!r}, which this batch lacks (keys: "
                f"{sorted(inputs)}). Keep it in the dataset and the batch: Trainer(args=TrainingArguments(..., "
                "remove_unused_columns=False)) and a collator that passes it through (TeacherSet.collator)."
            )
        values = inputs[col]
        values = values.tolist() if torch.is_tensor(values) else list(values)
        if len(values) != batch_size:
            raise ValueError(f"Routing column {col!r} has {len(values)} entries for a batch of {batch_size} rows.")
        index = [self._teacher_index(v) for v in values]
        return torch.tensor(index, dtype=torch.long)

    def _teacher_index(self, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ValueError(
                f"Routing column {self.teacher_column!r} holds {value!r}; each row must name a teacher by index "
                f"(0..{len(self.modules) - 1}) or by name ({', '.join(self.names)})."
            )
        if isinstance(value, int):
            if not 0 <= value < len(self.modules):
                raise ValueError(
                    f"Routing column {self.teacher_column!r} names teacher index {value}, but the set has "
                    f"{len(self.modules)} teachers (0..{len(self.modules) - 1}: {', '.join(self.names)})."
                )
            return value
        if value not in self.names:
            raise ValueError(
                f"Routing column {self.teacher_column!r} names an unknown teacher {value!r}; the set's teachers are "
                f"{', '.join(self.names)}. Fix the column or pass the teachers as a dict keyed by these names."
            )
        return self.names.index(value)

    def _router_weights(self, inputs: dict, batch_size: int) -> torch.Tensor:
        w = self.router(inputs)
        k = len(self.modules)
        if not torch.is_tensor(w) or tuple(w.shape) != (batch_size, k):
            shape = tuple(w.shape) if torch.is_tensor(w) else type(w).__name__
            raise ValueError(
                f"TeacherSet router must return a [{batch_size}, {k}] tensor (rows x teachers), got {shape}"
            )
        w = w.detach().float().cpu()
        if not torch.isfinite(w).all() or (w < 0).any() or (w.sum(-1) <= 0).any():
            raise ValueError("TeacherSet router weights must be finite, >= 0, and have a positive sum in every row.")
        return w / w.sum(-1, keepdim=True)

    def collator(self, base: Callable[[list], dict]) -> Callable[[list], dict]:
        """Wrap a data collator so the routing column passes through as a list (names or indices) beside the
        collated batch (HF collators cannot collate strings)."""
        col = self.teacher_column
        if col is None:
            raise ValueError("TeacherSet.collator: this set has no teacher_column to pass through.")

        def collate(features: list) -> dict:
            routes = [f[col] for f in features]
            batch = base([{k: v for k, v in f.items() if k != col} for f in features])
            batch[col] = routes
            return batch

        return collate

    # ------------------------------------------------------------------ engine hooks
    def fit_config(self, config: DistillationConfig) -> DistillationConfig:
        """The engine's config for this set: the fused path needs one resident teacher."""
        if self.runs_as_single or config.fused_loss is False:
            return config
        if config.fused_loss:
            raise ValueError(
                "fused_loss=True needs one resident teacher; a TeacherSet with several teachers or offload=True "
                "feeds the plain path. Set fused_loss=None or False."
            )
        return resolve_config(DistillationConfig, config, {"fused_loss": False})

    def bind(self, config: DistillationConfig) -> Teacher:
        """Build one :class:`Teacher` per member (offloaded sets park theirs on CPU). Returns the first: the
        engine's single-teacher checks and hooks use it."""
        device = "cpu" if self.offload else config.teacher_device
        self.runners = [
            Teacher(m, device=device, dtype=config.teacher_dtype, quantization=config.teacher_quantization)
            for m in self.modules
        ]
        self._row_losses = {}
        if len(self.runners) > 1 and any(r.sharded for r in self.runners):  # see distill/sharded_teacher.py
            raise ValueError(
                "A TeacherSet of several teachers runs each teacher on its routed rows only, so ranks would run a "
                "sharded (FSDP2) teacher a different number of times and deadlock. Shard only a single teacher."
            )
        return self.runners[0]

    def setup(self, engine: Any, student: nn.Module) -> None:
        """Check the set against the engine's resolved config and student, and place the other teachers (the
        engine placed the first)."""
        cfg = engine.config
        if len(self.modules) > 1 or self.offload:
            if engine.crosstok is not None or engine.retokenize:
                raise ValueError(
                    "A TeacherSet with several teachers (or offload=True) needs teachers that share the student's "
                    "tokenizer; cross-tokenizer terms (alm, uld) and re-tokenised teachers are not supported in a "
                    "set. Distil from such a teacher on its own."
                )
        if len(self.modules) > 1:
            check_set_terms(cfg, self.aggregation)
        for runner in self.runners[1:]:
            runner.check_separate(student)
            runner.place(student)
        self._check_vocabularies(engine.task)

    def _check_vocabularies(self, task: str) -> None:
        key = "num_labels" if task in ("seq_classification", "token_classification") else "vocab_size"
        sizes = {n: getattr(getattr(m, "config", None), key, None) for n, m in zip(self.names, self.modules)}
        known = {n: v for n, v in sizes.items() if v is not None}
        if len(set(known.values())) > 1:
            listed = ", ".join(f"{n}: {v}" for n, v in known.items())
            raise ValueError(
                f"The teachers of a TeacherSet have different vocabularies ({key} {listed}). Mixing or comparing "
                "their distributions token by token needs one shared tokenizer (label set), and cross-tokenizer "
                "losses are not supported in a set: use teachers that share the student's tokenizer, or distil "
                "each other teacher on its own with loss_terms='alm' / 'uld'."
            )

    def forward(self, engine: Any, inputs: dict, *, need_attentions: bool = False, extra: dict | None = None) -> Any:
        """The teachers on their rows: one teacher's own outputs, or (several teachers) :class:`TeacherSetOutputs`
        that :meth:`logit_terms` and :meth:`embedding_terms` aggregate."""
        batch = _batch_size(inputs)
        device = model_device(engine.student)

        def run_all(k: int) -> Any:
            with self._resident(self.runners[k], device):
                return self._run(engine, self.runners[k], inputs, need_attentions, extra)

        weights, done = self.weights_and_reference(inputs, batch, run_all)
        per_teacher = []
        for k, runner in enumerate(self.runners):
            if k in done:  # ran on every row already (a zero weight adds nothing to either aggregation)
                per_teacher.append((k, torch.arange(batch), done[k]))
                continue
            rows = (weights[:, k] > 0).nonzero().flatten()
            if rows.numel() == 0:
                continue
            sub = inputs if rows.numel() == batch else _take_rows(inputs, rows, batch)
            with self._resident(runner, device):
                out = self._run(engine, runner, sub, need_attentions, extra)
            per_teacher.append((k, rows, out))
        if len(self.modules) == 1:
            return per_teacher[0][2]
        self._check_widths(per_teacher)
        return TeacherSetOutputs(weights, per_teacher)

    @contextlib.contextmanager
    def _resident(self, runner: Teacher, device: torch.device) -> Iterator[None]:
        if not self.offload:
            yield
            return
        with runner.moved_to(device):
            yield

    def _run(self, engine: Any, runner: Teacher, inputs: dict, need_attentions: bool, extra: dict | None) -> Any:
        """The engine's plain teacher forward for one member (same inputs, same keys)."""
        keep = ("labels",) if engine.task == "seq2seq" else ()  # the decoder inputs are derived from the labels
        drop = (self.teacher_column,) if self.teacher_column else ()
        tin = runner.model_inputs(inputs, keep=keep, drop=drop)
        if need_attentions:
            tin["output_attentions"] = True
        tin.update(extra or {})
        return runner.run(lambda m: m(**tin))

    def _check_widths(self, per_teacher: list) -> None:
        widths = {self.names[k]: out["logits"].shape[-1] for k, _, out in per_teacher if "logits" in out}
        if len(set(widths.values())) > 1:
            listed = ", ".join(f"{n}: {v}" for n, v in widths.items())
            raise ValueError(
                f"The teachers of a TeacherSet returned logits of different widths ({listed}): they have different "
                "vocabularies. A set needs one shared tokenizer (label set); cross-tokenizer losses are not "
                "supported in a set."
            )

    def logit_terms(self, engine: Any, terms: Any, inputs: dict, s_out: Any, t_out: TeacherSetOutputs, scaling):
        """The logit terms of several teachers: the engine's terms on the mixture ``{"logits": T * log p_mix}``,
        or ``sum_i w_i D(p_i, q)`` per row, normalised like the engine's logit terms."""
        s_all = s_out["logits"] if isinstance(s_out, dict) else s_out[1]
        if self.aggregation == "mixture":
            batch, temperature = t_out.weights.shape[0], engine.config.temperature
            mix = mixture_logits(t_out.per_teacher, t_out.weights, temperature, batch, s_all.device)
            return engine._logit_terms(terms, inputs, s_out, {"logits": mix}, scaling)
        labels_all, attn_all = inputs.get("labels"), inputs.get("attention_mask")
        s, _, labels, mask = engine._aligned_logits(s_out, {"logits": s_all.detach()}, labels_all, attn_all)
        count = int(_valid_rows(s, labels, mask).sum())
        names = [n for n, k in engine.config.kinds.items() if k == "logits"]
        totals = {n: s.new_zeros((), dtype=torch.float32) for n in names}
        for k, rows, out in t_out.per_teacher:
            rows_dev = rows.to(s_all.device)
            sk, tk, lk, mk = engine._aligned_logits(
                {"logits": s_all[rows_dev]}, out, _rows_of(labels_all, rows), _rows_of(attn_all, rows)
            )
            valid = _valid_rows(sk, lk, mk)
            w = t_out.weights[rows, k].to(sk.device).view(-1, *([1] * (valid.dim() - 1))).expand_as(valid)
            for name in names:
                per_row = self._row_loss(engine, name, "logits")(sk, tk, labels=lk, mask=mk)
                totals[name] = totals[name] + (per_row * w).sum()
        for name in names:
            mean = totals[name] / max(count, 1)
            terms.add(name, scaling.token_sum(totals[name], count) if labels is not None else scaling.mean(mean), mean)

    def pooled_pairs(self, engine: Any, inputs: dict, s_out: Any, t_out: TeacherSetOutputs) -> TeacherSetEmbeddings:
        """The student's pooled embeddings and each teacher's on its rows (engine's pooling and masks)."""
        attn = inputs.get("attention_mask")
        s_emb = engine._pool(s_out, attn)
        per = [
            (k, rows, engine._pool(out, _rows_of(attn, rows)).to(s_emb.device)) for k, rows, out in t_out.per_teacher
        ]
        return TeacherSetEmbeddings(s_emb, per, t_out.weights)

    def embedding_terms(self, engine: Any, terms: Any, emb: TeacherSetEmbeddings, scaling: Any) -> None:
        """``(1/B) sum_rows sum_i w_i D(head_i(s), t_i)`` per embedding term: one projector per teacher (created
        when the widths differ, saved with the engine's projectors), whatever the aggregation."""
        if not isinstance(emb, TeacherSetEmbeddings):
            raise ValueError(
                "Pair batches (positive_* inputs) with several teachers are not supported; use ordinary batches or "
                "one teacher (e.g. TeacherSet.nearest(teachers, scores))."
            )
        batch, device = emb.student.shape[0], emb.student.device
        for name in [n for n, k in engine.config.kinds.items() if k == "embedding"]:
            total = emb.student.new_zeros((), dtype=torch.float32)
            for k, rows, t_emb in emb.per_teacher:
                s = emb.student[rows.to(device)]
                proj = None
                if getattr(engine.losses[name], "needs_width", True):
                    proj = engine.bank.get(f"embedding.{name}.{self.names[k]}", s.shape[-1], t_emb.shape[-1], device)
                per_row = self._row_loss(engine, name, "embedding")(proj(s) if proj is not None else s, t_emb)
                total = total + (per_row * emb.weights[rows, k].to(device)).sum()
            value = total / max(batch, 1)
            terms.add(name, scaling.mean(value), value)

    def _row_loss(self, engine: Any, name: str, kind: str) -> nn.Module:
        if name not in self._row_losses:
            self._row_losses[name] = row_loss(engine.config, name, kind)
        return self._row_losses[name]


def check_set_terms(
    config: DistillationConfig,
    aggregation: str,
    kinds: tuple[str, ...] = ("logits", "embedding"),
    where: str = "TeacherSet",
) -> None:
    """Refuse terms that several teachers cannot share: kinds other than ``kinds`` (they read one teacher's hidden
    states, attentions or tokenizer) and, for a mixture, terms that compare raw logits."""
    other = sorted(n for n, k in config.kinds.items() if k not in kinds)
    if other:
        names = " or ".join({"logits": "logit", "embedding": "embedding"}.get(k, k) for k in kinds)
        raise ValueError(f"{where}: the terms {other} are not {names} terms. " + _NON_LOGIT_HINT)
    raw = sorted(n for n in config.kinds if get_loss_spec(n).name in _RAW_LOGIT_TERMS)
    if raw and aggregation == "mixture":
        raise ValueError(
            f"{where}: {raw} compare raw logits, which a mixture of probabilities does not have; use "
            "aggregation='sum_of_divergences' or a divergence (kl, jsd, ...)."
        )


def row_loss(config: DistillationConfig, name: str, kind: str) -> nn.Module:
    """The loss ``name`` with ``reduction="none"`` (one value per row), with ``config``'s keywords (and temperature
    for logit terms): what ``sum_of_divergences`` weights per row and per teacher."""
    kw = dict(config.loss_kwargs.get(name, {}))
    if kind == "logits":
        kw.setdefault("temperature", config.temperature)
    try:
        return get_loss(name, **kw, reduction="none")
    except TypeError as e:
        raise ValueError(
            f"A TeacherSet weights the term {name!r} per row and per teacher, but it has no per-row "
            "reduction; use a divergence such as kl / jsd (logits) or embedding_mse / embedding_cosine, or "
            "aggregation='mixture' for logit terms."
        ) from e


def split_routing_columns(teacher_set: TeacherSet | None, inputs: dict) -> tuple[dict, dict]:
    """``(inputs without the routing column, {column: values})``: the student never sees the column, the teacher
    set reads it (``({...}, {})`` when there is no set or no column)."""
    col = getattr(teacher_set, "teacher_column", None)
    if col is None or col not in inputs:
        return inputs, {}
    return {k: v for k, v in inputs.items() if k != col}, {col: inputs[col]}


def softmax_weights(scores: Sequence[float], tau: float) -> torch.Tensor:
    """``softmax(score / tau)`` in float64: ``tau -> 0`` tends to one-hot at the best score, ``tau = inf`` is
    uniform."""
    if not tau > 0:
        raise ValueError(f"tau must be > 0 (small: nearest teacher, inf: uniform), got {tau}")
    s = torch.tensor([float(x) for x in scores], dtype=torch.float64)
    if not torch.isfinite(s).all():
        raise ValueError(f"teacher scores must be finite, got {s.tolist()}")
    if math.isinf(tau):
        return torch.full_like(s, 1.0 / len(s))
    return torch.softmax(s / tau, 0)


def mixture_logits(per_teacher: list, weights: torch.Tensor, temperature: float, batch: int, device) -> torch.Tensor:
    """``T * logsumexp_i(log w_i + log softmax(z_i / T))`` over the teachers that ran on each row, float32."""
    mix = None
    for k, rows, out in per_teacher:
        z = _logits_of(out).to(device).float()
        logp = torch.log_softmax(z / temperature, -1)
        log_w = weights[rows, k].to(device).log().view(-1, *([1] * (logp.dim() - 1)))
        if mix is None:
            mix = torch.full((batch, *logp.shape[1:]), float("-inf"), device=device)
        rows = rows.to(device)
        mix[rows] = torch.logaddexp(mix[rows], log_w + logp)
    return temperature * mix


# ---------------------------------------------------------------------- helpers
def _normalised_weights(weights: Sequence[float] | torch.Tensor, k: int) -> torch.Tensor:
    w = torch.as_tensor(weights, dtype=torch.float64).flatten()
    if w.numel() != k:
        raise ValueError(f"TeacherSet weights: {w.numel()} weights for {k} teachers; give one per teacher.")
    if not torch.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"TeacherSet weights must be finite, >= 0 and not all 0, got {w.tolist()}")
    return w / w.sum()


def _checked_relevance(relevance: ClassRelevance | None, k: int) -> ClassRelevance | None:
    if relevance is None:
        return None
    if not isinstance(relevance, ClassRelevance):
        raise TypeError(f"class_relevance must be a ClassRelevance, got {type(relevance).__name__}")
    scores = relevance.scores
    if scores.dim() != 2 or scores.shape[0] != k:
        raise ValueError(f"class_relevance.scores must be [{k}, C] (one row per teacher), got {tuple(scores.shape)}")
    if not torch.isfinite(scores).all():
        raise ValueError(f"class_relevance.scores must be finite, got {scores.tolist()}")
    if not relevance.tau > 0:
        raise ValueError(f"tau must be > 0 (inf: uniform), got {relevance.tau}")
    if not 0 <= relevance.reference < k:
        raise ValueError(f"reference teacher index {relevance.reference} is outside 0..{k - 1}")
    return relevance


def _named(teachers: Sequence[nn.Module] | Mapping[str, nn.Module]) -> tuple[list[str], list[nn.Module]]:
    if isinstance(teachers, Mapping):
        return [str(n) for n in teachers], list(teachers.values())
    return [str(i) for i in range(len(teachers))], list(teachers)


def _score_list(scores: Sequence[float] | Mapping[str, float], names: list[str]) -> list[float]:
    if isinstance(scores, Mapping):
        missing = [n for n in names if n not in scores]
        if missing:
            raise ValueError(f"scores has no entry for the teachers {missing}; score every teacher.")
        return [float(scores[n]) for n in names]
    values = [float(s) for s in scores]
    if len(values) != len(names):
        raise ValueError(f"{len(values)} scores for {len(names)} teachers; give one score per teacher.")
    return values


def _batch_size(inputs: dict) -> int:
    for key in ("input_ids", "inputs_embeds", "pixel_values", "attention_mask"):
        if torch.is_tensor(inputs.get(key)):
            return inputs[key].shape[0]
    for v in inputs.values():
        if torch.is_tensor(v) and v.dim() > 0:
            return v.shape[0]
    raise ValueError(f"Cannot tell the batch size of a batch with keys {sorted(inputs)}; it has no tensor inputs.")


def _take_rows(inputs: dict, rows: torch.Tensor, batch: int) -> dict:
    """The sub-batch of ``rows``: every per-row tensor or list is indexed, other values are kept."""
    out = {}
    for key, v in inputs.items():
        if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == batch:
            out[key] = v[rows.to(v.device)]
        elif isinstance(v, list) and len(v) == batch:
            out[key] = [v[i] for i in rows.tolist()]
        else:
            out[key] = v
    return out


def _rows_of(x: torch.Tensor | None, rows: torch.Tensor) -> torch.Tensor | None:
    return None if x is None else x[rows.to(x.device)]


def _logits_of(out: Any) -> torch.Tensor:
    return out["logits"] if isinstance(out, dict) else out.logits


def _valid_rows(logits: torch.Tensor, labels: torch.Tensor | None, mask: torch.Tensor | None) -> torch.Tensor:
    return valid_mask(logits.shape[:-1], labels=labels, mask=mask, device=logits.device)
