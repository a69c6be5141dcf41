"""Ranking and retrieval distillation recipes.

* :mod:`kd_plugins.ranking.first`: FIRST listwise prompts, identifier-token mapping and single-token-decoding
  reranking (one forward pass), plus training batches for the joint LM + weighted-RankNet loss.
* :mod:`kd_plugins.ranking.trans_encoder`: Trans-Encoder mutual distillation between bi- and cross-encoders.
* :mod:`kd_plugins.ranking.retrieval`: cross-encoder teacher -> bi-encoder student with ranking-distillation losses
  (the BBC benchmark recipe).

The losses themselves live in :mod:`kd_plugins.losses.ranking` (registered: ``first_ranknet``, ``margin_mse``,
``ranknet``, ``lambdarank``, ``listnet``, ``pld``, ``cprd``, ``dear``).
"""

from .first import (
    DEFAULT_IDENTIFIERS,
    FirstExample,
    build_listwise_prompt,
    collate_first,
    first_model_loss,
    first_rerank,
    first_scores,
    first_training_example,
    identifier_token_ids,
    sliding_window_rerank,
)
from .retrieval import (
    CrossEncoder,
    RerankGroups,
    distill_loss_fn,
    encode_texts,
    mine_candidates,
    rerank_metrics,
    train_bi_encoder,
    train_cross_encoder,
)
from .trans_encoder import BiEncoder, TransEncoderHistory, trans_encoder

__all__ = [
    "DEFAULT_IDENTIFIERS",
    "FirstExample",
    "build_listwise_prompt",
    "collate_first",
    "first_model_loss",
    "first_rerank",
    "first_scores",
    "first_training_example",
    "identifier_token_ids",
    "sliding_window_rerank",
    "BiEncoder",
    "TransEncoderHistory",
    "trans_encoder",
    "CrossEncoder",
    "RerankGroups",
    "distill_loss_fn",
    "encode_texts",
    "mine_candidates",
    "rerank_metrics",
    "train_bi_encoder",
    "train_cross_encoder",
]
