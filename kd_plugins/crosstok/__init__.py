"""Cross-tokenizer distillation: a teacher whose tokenizer differs from the student's.

* :mod:`kd_plugins.crosstok.align`: chunk alignment of two tokenizations of one text by UTF-8 byte offsets.
* :mod:`kd_plugins.crosstok.teacher`: :class:`CrossTokenizerTeacher` (re-tokenize the student's batch, run the
  teacher, align chunks) and :func:`cross_tokenizer_loss` (ALM or ULD from the student's logits).
* :mod:`kd_plugins.crosstok.chat`: :class:`ChatFormat` (a chat template as per-role headers and footers; parse a
  conversation row into messages) and :func:`render_messages` (the same messages in another template), used by
  ``CrossTokenizerTeacher(chat=True)``.
* :mod:`kd_plugins.crosstok.transfer`: :func:`transfer_tokenizer` (move a model to a new tokenizer: embeddings
  initialised from the old tokenizer's pieces), :class:`TokenizerTransferConfig`; the training recipe is
  ``kd_plugins.integrations.hf.tokenizer_transfer.train_transferred`` (ALM through ``DistillationCallback``).

The distillation core computes ``alm`` / ``uld`` when they are named in ``DistillationConfig.loss_terms``
(``DistillationCallback(teacher, config, teacher_tokenizer=...)``, see ``kd_plugins/distill/cross_tokenizer.py``).

The losses live in :mod:`kd_plugins.losses.cross_tokenizer` (registered: ``alm``, ``uld``). See
``docs/cross_tokenizer.md``.
"""

from .align import (
    AlignmentError,
    ChunkAlignment,
    align_offsets,
    align_text,
    alignment_stats,
    byte_offsets,
    chunk_id_tensors,
    tokenize_with_offsets,
)
from .chat import ChatFormat, ChatFormatError, Message, render_messages
from .config import TokenizerTransferConfig
from .teacher import CrossTokenizerTeacher, RoundTripError, cross_tokenizer_loss
from .transfer import TransferPlan, tokenizer_transfer_plan, transfer_rows, transfer_tokenizer

__all__ = [
    "AlignmentError",
    "ChunkAlignment",
    "align_offsets",
    "align_text",
    "alignment_stats",
    "byte_offsets",
    "chunk_id_tensors",
    "tokenize_with_offsets",
    "ChatFormat",
    "ChatFormatError",
    "Message",
    "render_messages",
    "CrossTokenizerTeacher",
    "RoundTripError",
    "cross_tokenizer_loss",
    "TokenizerTransferConfig",
    "TransferPlan",
    "tokenizer_transfer_plan",
    "transfer_rows",
    "transfer_tokenizer",
]
