"""HAD (Hybrid Architecture Distillation; Yang et al., 2025): masked-LM pre-training of a small student that
reconstructs the masked tokens (MLM loss) while its features of the *visible* tokens are aligned to a large teacher's.

The framework-agnostic parts, used by :class:`~kd_plugins.integrations.hf.had.HADCallback`:

* :func:`grouped_mask` - the grouping masking strategy: each row's maskable tokens (not special, not padding) are cut
  into contiguous groups of ``group_size`` tokens (the first group starts at a random offset, so group boundaries
  move from row to row) and whole groups are drawn without replacement until ``round(mask_ratio * n)`` tokens are
  masked (the last group drawn is cut short to hit that count exactly). The paper masks the teacher's k-mer tokens
  (6 nucleotides each) and maps each masked k-mer to the student's nucleotide positions, so that a masked group of
  student tokens is exactly one teacher token; with one tokenizer for both models a group is ``group_size`` tokens.
* :class:`HADCollator` - pads a batch, applies :func:`grouped_mask` and writes the transformers MLM batch
  (``input_ids`` masked, ``labels`` = the original token at masked positions and -100 elsewhere, like
  ``DataCollatorForLanguageModeling``) plus the visible-token mask (``had_visible``: attended and not masked).
* :func:`visible_feature_loss` / :func:`had_feature_loss` - the alignment term
  ``mean_pairs mean_{visible tokens i} d(P(h_s[i]), h_t[i])``, ``d`` = ``1 - cos`` or the mean squared error
  (the registered ``hidden_cosine`` / ``hidden_mse`` losses), ``P`` a learned linear projector when the widths differ.

The teacher sees the unmasked sequence (``teacher_input="full"``: its input is ``input_ids`` with the labels put
back at the masked positions) or the same masked input as the student (``"masked"``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .._config import resolve_config
from ..losses._common import IGNORE_INDEX
from ..losses.feature import hidden_cosine, hidden_mse
from .had_config import HADConfig
from .projectors import ProjectorBank

__all__ = [
    "grouped_mask",
    "HADCollator",
    "unmasked_input_ids",
    "check_had_batch",
    "check_mlm_student",
    "check_same_vocabulary",
    "visible_feature_loss",
    "had_feature_loss",
]


def _row_groups(n: int, group_size: int, generator: torch.Generator | None) -> list[tuple[int, int]]:
    """``[start, end)`` groups covering ``0..n-1``: full groups of ``group_size``, the first one starting at a random
    offset (the tokens before it form a shorter group, as may the last)."""
    g = min(group_size, n)
    offset = int(torch.randint(0, g, (1,), generator=generator)) if g > 1 else 0
    bounds = sorted({0, *range(offset, n, g), n})
    return list(zip(bounds[:-1], bounds[1:]))


def grouped_mask(
    maskable: torch.Tensor, mask_ratio: float, group_size: int, *, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Grouped masking of a ``[B, T]`` batch: which positions are masked (bool ``[B, T]``).

    Each row masks exactly ``max(1, round(mask_ratio * n))`` of its ``n`` maskable positions (``maskable``: not a
    special token, not padding), as whole groups of ``group_size`` consecutive maskable positions drawn without
    overlap (the last group drawn may be cut short). Rows without maskable positions mask nothing. Deterministic for
    a seeded ``generator``.
    """
    if maskable.dim() != 2 or maskable.dtype != torch.bool:
        raise ValueError(f"maskable must be a bool [batch, seq] tensor, got {maskable.dtype} {tuple(maskable.shape)}")
    if not 0 < mask_ratio < 1:
        raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio!r}")
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size!r}")
    masked = torch.zeros_like(maskable)
    for b in range(maskable.shape[0]):
        positions = maskable[b].nonzero().squeeze(1)
        n = positions.numel()
        if n == 0:
            continue
        target = min(n, max(1, int(mask_ratio * n + 0.5)))
        groups = _row_groups(n, group_size, generator)
        taken = 0
        for gi in torch.randperm(len(groups), generator=generator).tolist():
            start, end = groups[gi]
            take = min(end - start, target - taken)
            masked[b, positions[start : start + take]] = True
            taken += take
            if taken == target:
                break
    return masked


def unmasked_input_ids(input_ids: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX):
    """The sequence before masking: ``input_ids`` with the original tokens (the MLM labels) put back at the masked
    positions."""
    return torch.where(labels != ignore_index, labels, input_ids)


class HADCollator:
    """Pads a list of tokenized examples and applies HAD's grouped masking.

    Returns ``input_ids`` (masked), ``attention_mask``, any other padded model input (``token_type_ids``), ``labels``
    (the original token at masked positions, -100 elsewhere) and, with ``return_visible``, ``config.visible_key``:
    bool ``[B, T]``, True where a token is attended and not masked (special tokens included: both models see them).

    Args:
        tokenizer: the student's tokenizer (it must have a mask token; it pads the batch).
        config: a :class:`~kd_plugins.distill.had_config.HADConfig` (masking fields); ``**overrides`` replace them.
        seed: seeds the collator's own generator (the same sequence of batches gets the same masks); ``None``: the
            global torch RNG. In DataLoader workers the seed is offset by the worker id.
        return_visible: ``False`` leaves the visible mask out (a plain-MLM baseline with the same masking, without
            ``HADCallback``, whose model would not accept the extra key).
        pad_to_multiple_of: passed to ``tokenizer.pad``.
    """

    def __init__(
        self,
        tokenizer,
        config: HADConfig | None = None,
        *,
        seed: int | None = None,
        return_visible: bool = True,
        pad_to_multiple_of: int | None = None,
        **overrides,
    ):
        if getattr(tokenizer, "mask_token", None) is None:
            raise ValueError(
                f"{type(tokenizer).__name__} has no mask token: masked-LM pre-training needs one "
                "(tokenizer.add_special_tokens({'mask_token': '[MASK]'}) and resize the student's embeddings)"
            )
        self.tokenizer = tokenizer
        self.config = resolve_config(HADConfig, config, overrides)
        self.seed = seed
        self.return_visible = return_visible
        self.pad_to_multiple_of = pad_to_multiple_of
        self._generator: torch.Generator | None = None
        self._worker: int | None = None

    def generator(self) -> torch.Generator | None:
        if self.seed is None:
            return None
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else -1
        if self._generator is None or worker != self._worker:
            self._generator = torch.Generator().manual_seed(self.seed + 1000003 * (worker + 1))
            self._worker = worker
        return self._generator

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        examples = [{k: v for k, v in ex.items() if k != "labels"} for ex in examples]
        batch = dict(self.tokenizer.pad(examples, return_tensors="pt", pad_to_multiple_of=self.pad_to_multiple_of))
        input_ids = batch["input_ids"].clone()
        maskable = self._maskable(batch, input_ids)
        cfg, gen = self.config, self.generator()
        masked = grouped_mask(maskable, cfg.mask_ratio, cfg.group_size, generator=gen)
        labels = torch.where(masked, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
        batch["input_ids"] = self._replace(input_ids, masked, gen)
        batch["labels"] = labels
        if self.return_visible:
            attended = batch["attention_mask"].bool() if "attention_mask" in batch else torch.ones_like(masked)
            batch[cfg.visible_key] = attended & ~masked
        return batch

    def _maskable(self, batch: dict, input_ids: torch.Tensor) -> torch.Tensor:
        special = batch.pop("special_tokens_mask", None)
        if special is None:
            special = torch.tensor(
                [
                    self.tokenizer.get_special_tokens_mask(row, already_has_special_tokens=True)
                    for row in input_ids.tolist()
                ],
                dtype=torch.bool,
            )
        maskable = ~special.bool()
        if "attention_mask" in batch:
            maskable &= batch["attention_mask"].bool()
        if self.tokenizer.pad_token_id is not None:
            maskable &= input_ids != self.tokenizer.pad_token_id
        return maskable

    def _replace(self, input_ids: torch.Tensor, masked: torch.Tensor, gen) -> torch.Tensor:
        """The mask token at ``mask_replace_prob`` of the masked positions, a random token at ``random_replace_prob``,
        the original token at the rest (``DataCollatorForLanguageModeling``'s rule)."""
        cfg = self.config
        out = input_ids.clone()
        if cfg.mask_replace_prob >= 1:  # no draw: the masks of later batches do not depend on this batch's shape
            out[masked] = self.tokenizer.convert_tokens_to_ids(self.tokenizer.mask_token)
            return out
        draw = torch.rand(input_ids.shape, generator=gen)
        to_mask = masked & (draw < cfg.mask_replace_prob)
        to_random = masked & ~to_mask & (draw < cfg.mask_replace_prob + cfg.random_replace_prob)
        out[to_mask] = self.tokenizer.convert_tokens_to_ids(self.tokenizer.mask_token)
        if to_random.any():
            out[to_random] = torch.randint(len(self.tokenizer), (int(to_random.sum()),), generator=gen)
        return out


def check_had_batch(inputs: Mapping[str, Any], visible_key: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch's ``labels`` and visible mask, after checking they exist and agree (no prediction target is
    visible). Errors name the missing piece and the collator that provides it."""
    labels, visible = inputs.get("labels"), inputs.get(visible_key)
    if labels is None:
        raise ValueError(
            "HAD needs MLM 'labels' in the training batch (the original token at masked positions, -100 elsewhere); "
            "use kd_plugins.HADCollator(tokenizer) as the Trainer's data_collator"
        )
    if visible is None:
        raise ValueError(
            f"the training batch has no visible-token mask {visible_key!r}: use kd_plugins.HADCollator(tokenizer) "
            "as the Trainer's data_collator (it writes the mask), or add the key to your own collator (bool "
            "[batch, seq]: attended and not masked)"
        )
    if tuple(visible.shape) != tuple(labels.shape):
        raise ValueError(
            f"{visible_key!r} has shape {tuple(visible.shape)} but labels {tuple(labels.shape)}; one entry per token"
        )
    visible = visible.bool()
    if (visible & (labels != IGNORE_INDEX)).any():
        raise ValueError(
            f"{visible_key!r} marks masked tokens (labels != -100) as visible: the visible mask and the labels come "
            "from different maskings; build both in one collator (HADCollator)"
        )
    return labels, visible


def check_mlm_student(model: torch.nn.Module) -> None:
    """The student must be a masked-LM (a bidirectional encoder with an output head over its vocabulary)."""
    name = type(model).__name__
    cfg = getattr(model, "config", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        raise ValueError(
            f"HAD pre-trains a masked-LM student, but {name} has no LM head (get_output_embeddings() is None); "
            "load it with AutoModelForMaskedLM (e.g. BertForMaskedLM), not AutoModel"
        )
    if name.endswith("ForCausalLM") or getattr(cfg, "is_decoder", False):
        raise ValueError(f"HAD pre-trains a masked-LM student; {name} is a causal (decoder) LM")


def check_same_vocabulary(student, teacher, student_tokenizer=None, teacher_tokenizer=None) -> None:
    """HAD aligns features token by token: both models must read the same token ids."""
    s_vocab = getattr(getattr(student, "config", None), "vocab_size", None)
    t_vocab = getattr(getattr(teacher, "config", None), "vocab_size", None)
    if s_vocab is not None and t_vocab is not None and s_vocab != t_vocab:
        raise ValueError(
            f"the teacher has another vocabulary ({t_vocab} tokens) than the student ({s_vocab}); HAD aligns "
            "features token by token and needs one tokenizer for both (for a teacher with another tokenizer use "
            "DistillationCallback(teacher, teacher_tokenizer=...))"
        )
    if student_tokenizer is not None and teacher_tokenizer is not None:
        if student_tokenizer.get_vocab() != teacher_tokenizer.get_vocab():
            raise ValueError(
                f"the teacher's tokenizer ({type(teacher_tokenizer).__name__}, {len(teacher_tokenizer)} tokens) "
                f"differs from the student's ({type(student_tokenizer).__name__}, {len(student_tokenizer)}); HAD "
                "needs one tokenizer for both models"
            )


def visible_feature_loss(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    visible: torch.Tensor,
    *,
    loss: str = "cosine",
    projector=None,
) -> torch.Tensor:
    """Mean over the visible tokens (bool ``[B, T]``) of ``1 - cos(P(s), t)`` (``loss="cosine"``) or of the mean
    squared error over channels (``"mse"``); ``P`` = ``projector`` (required when the widths differ)."""
    fn = {"cosine": hidden_cosine, "mse": hidden_mse}.get(loss)
    if fn is None:
        raise ValueError(f"loss must be 'cosine' or 'mse', got {loss!r}")
    return fn(student_hidden, teacher_hidden.to(student_hidden.device), mask=visible, projector=projector)


def _state(states: Sequence[torch.Tensor], index: int, who: str) -> torch.Tensor:
    if not -len(states) <= index < len(states):
        raise ValueError(
            f"HADConfig.layers names {who} hidden_states index {index}, but the {who} has {len(states)} "
            f"(0 = embeddings .. {len(states) - 1} = last layer)"
        )
    return states[index]


def had_feature_loss(
    student_states: Sequence[torch.Tensor],
    teacher_states: Sequence[torch.Tensor],
    visible: torch.Tensor,
    config: HADConfig,
    projectors: ProjectorBank,
) -> torch.Tensor:
    """The HAD alignment term: :func:`visible_feature_loss` averaged over ``config.layers`` (``hidden_states``
    indices of student and teacher), with a projector from ``projectors`` where widths differ."""
    terms = []
    for s_index, t_index in config.layers:
        s = _state(student_states, s_index, "student")
        t = _state(teacher_states, t_index, "teacher")
        if s.shape[-1] != t.shape[-1] and not config.projector:
            raise ValueError(
                f"feature widths differ (student hidden_states[{s_index}]: {s.shape[-1]}, teacher "
                f"hidden_states[{t_index}]: {t.shape[-1]}) and HADConfig.projector=False; set projector=True "
                "(a learned linear map to the teacher's width) or align layers of equal width"
            )
        key = f"had_s{s_index}_t{t_index}".replace("-", "m")
        projector = projectors.get(key, s.shape[-1], t.shape[-1], s.device)
        terms.append(visible_feature_loss(s, t, visible, loss=config.feature_loss, projector=projector))
    return torch.stack(terms).mean()
