"""The tokenizer-transfer recipe on a Hugging Face Trainer: train a transferred model against the original with ALM.

:func:`train_transferred` is the second step after :func:`kd_plugins.crosstok.transfer.transfer_tokenizer`: an
unmodified ``transformers.Trainer`` over text rows tokenized by the new tokenizer, with
``DistillationCallback(original, DistillationConfig(loss_terms="alm:1", hard_label_weight=1),
teacher_tokenizer=old_tokenizer)`` (the cross-tokenizer terms of the distillation core, see
``docs/cross_tokenizer.md``). ``kd-plugins transfer-tokenizer`` runs both steps on a text file.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable

import torch.nn as nn
from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

from ..._config import resolve_config
from ...crosstok.transfer import TokenizerTransferConfig, transfer_rows
from ...distill.config import DistillationConfig
from .distill import DistillationCallback

__all__ = ["train_transferred"]


def _freeze_all_but_embeddings(model: nn.Module) -> None:
    keep = {id(p) for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m for p in m.parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)


def train_transferred(
    student: nn.Module,
    student_tokenizer,
    teacher: nn.Module,
    teacher_tokenizer,
    texts: Iterable[str],
    config: TokenizerTransferConfig | None = None,
    *,
    output_dir: str | None = None,
    training_args: TrainingArguments | None = None,
    **overrides,
) -> Trainer:
    """Train a tokenizer-transferred ``student`` on ``texts`` against the original model ``teacher``.

    Args:
        student: the model returned by ``transfer_tokenizer`` (reads ``student_tokenizer``).
        teacher: the original model (reads ``teacher_tokenizer``); frozen, moved to the student's device.
        texts: training texts; cut at whitespace into rows of ``config.max_length`` new tokens
            (:func:`kd_plugins.crosstok.transfer.transfer_rows`).
        config: a :class:`~kd_plugins.crosstok.transfer.TokenizerTransferConfig` (``steps``, ``learning_rate``,
            ``batch_size``, ``alm_weight``, ``uld_weight``, ``ce_weight``, ...); ``overrides`` replace its fields.
        output_dir / training_args: where the Trainer writes (default: a temporary directory), or complete
            ``TrainingArguments`` (then the config's optimisation fields are not used).

    Returns:
        The Trainer after ``train()`` (its ``state.log_history`` holds ``kd_alm`` / ``kd_uld`` / ``kd_chunk_hidden``
        / ``task_loss``).
        With ``alm_weight = uld_weight = 0`` it trains with cross-entropy only and never runs the teacher.
    """
    cfg = resolve_config(TokenizerTransferConfig, config, overrides)
    if cfg.steps == 0 and training_args is None:
        raise ValueError("steps=0 means initialisation only: use transfer_tokenizer alone, or set steps >= 1.")
    if student_tokenizer.pad_token is None:
        raise ValueError(
            "The new tokenizer has no pad token, which the batches need; set one first, e.g. "
            "new_tokenizer.pad_token = new_tokenizer.eos_token (before transfer_tokenizer, so the config follows)."
        )
    rows = transfer_rows(texts, student_tokenizer, cfg.max_length)
    if not rows:
        raise ValueError("texts gave no training row (each needs at least 2 tokens); pass non-empty texts.")
    if training_args is None:
        training_args = TrainingArguments(
            output_dir=output_dir or tempfile.mkdtemp(prefix="kd_plugins_transfer_"),
            max_steps=cfg.steps,
            per_device_train_batch_size=cfg.batch_size,
            learning_rate=cfg.learning_rate,
            warmup_steps=cfg.warmup_steps,
            logging_steps=cfg.logging_steps,
            save_strategy="no",
            report_to="none",
            seed=cfg.seed,
        )
    # The recipe trains the whole student (a copy of a teacher frozen earlier would otherwise stay frozen).
    student.requires_grad_(True)
    if cfg.train_embeddings_only:
        _freeze_all_but_embeddings(student)
    callbacks = []
    if cfg.loss_terms:
        dcfg = DistillationConfig(
            loss_terms=cfg.loss_terms,
            hard_label_weight=cfg.ce_weight,
            term_balance=cfg.term_balance,
            teacher_device="student",
            # a row longer than max_length is truncated and may not round-trip: skip it (logged) rather than stop
            cross_tokenizer_options={"on_round_trip_error": "skip_row"}
            | ({"hidden_layers": cfg.hidden_layers} if cfg.hidden_weight > 0 else {}),
        )
        callbacks.append(DistillationCallback(teacher, dcfg, teacher_tokenizer=teacher_tokenizer))
    trainer = Trainer(
        model=student,
        args=training_args,
        train_dataset=rows,
        data_collator=DataCollatorForLanguageModeling(student_tokenizer, mlm=False),
        processing_class=student_tokenizer,
        callbacks=callbacks,
    )
    trainer.train()
    return trainer
