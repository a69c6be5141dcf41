"""FIRST: listwise reranking with single-token decoding (Reddy et al., EMNLP 2024).

A causal LM sees a listwise prompt (query + passages labelled ``[A]``, ``[B]``, ...) that ends where the answer
starts. The logits of the *first* generated token, read at the identifier tokens, are the relevance scores: one
forward pass ranks the whole window, no generation. Training combines the LM loss on the target permutation string
with FIRST's weighted RankNet on those first-token logits (:func:`kd_plugins.losses.first_joint_loss`).

Conventions chosen here (``docs/losses.md``, FIRST):

* The prompt ends with the answer prefix ``"["``; the target string is ``"C] > [A] > [B]"`` + EOS. So the score
  position is the last prompt token and the identifier must be a single token *after* ``"["`` in the given
  tokenizer - :func:`identifier_token_ids` checks exactly that (the repo silently assumed it).
* Identifiers default to ``A``..``T`` (20 = FIRST's window); longer lists use :func:`sliding_window_rerank`
  (window 20, stride 10, back to front, as the FIRST/RankGPT scripts do).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..losses import IGNORE_INDEX
from ..losses.ranking import first_joint_loss, pad_candidates, ranks_from_order

__all__ = [
    "DEFAULT_IDENTIFIERS",
    "build_listwise_prompt",
    "identifier_token_ids",
    "first_scores",
    "first_rerank",
    "sliding_window_rerank",
    "FirstExample",
    "first_training_example",
    "collate_first",
    "first_model_loss",
]

DEFAULT_IDENTIFIERS = tuple("ABCDEFGHIJKLMNOPQRST")
ANSWER_PREFIX = "["


def build_listwise_prompt(
    query: str,
    passages: Sequence[str],
    *,
    identifiers: Sequence[str] | None = None,
    max_passage_words: int | None = None,
    answer_prefix: str = ANSWER_PREFIX,
) -> str:
    """The RankZephyr/FIRST-style listwise prompt, ending with ``answer_prefix`` (where the ranking starts)."""
    ids = list(identifiers or DEFAULT_IDENTIFIERS)
    n = len(passages)
    if n == 0:
        raise ValueError("build_listwise_prompt() needs at least one passage")
    if n > len(ids):
        raise ValueError(
            f"{n} passages but only {len(ids)} identifiers; rerank long lists with "
            "sliding_window_rerank() or pass more identifiers"
        )
    if len(set(ids[:n])) != n:
        raise ValueError("identifiers must be distinct")
    lines = [
        f"I will provide you with {n} passages, each indicated by an alphabetical identifier []. Rank the "
        f"passages based on their relevance to the search query: {query}.",
        "",
    ]
    for ident, p in zip(ids, passages):
        words = p.split()
        if max_passage_words is not None:
            words = words[:max_passage_words]
        lines.append(f"[{ident}] {' '.join(words)}")
    lines += [
        "",
        f"Search Query: {query}.",
        f"Rank the {n} passages above based on their relevance to the search query. All the passages should "
        "be included and listed using identifiers, in descending order of relevance. The output format "
        f"should be [] > [], e.g., [{ids[0]}] > [{ids[min(1, n - 1)]}]. Only respond with the ranking "
        "results, do not say any word or explain.",
        "",
    ]
    return "\n".join(lines) + answer_prefix


def identifier_token_ids(
    tokenizer, identifiers: Sequence[str] | None = None, *, prefix: str = ANSWER_PREFIX
) -> list[int]:
    """Token id of every identifier as it follows ``prefix`` in the prompt; raises if one is not a single token.

    The check is done in context: ``encode(prefix + ident)`` must equal ``encode(prefix)`` plus exactly one token
    (the returned id; so merges such as ``"[A"`` are caught), and that token must not be the unknown token.
    """
    ids = list(identifiers or DEFAULT_IDENTIFIERS)
    base = tokenizer.encode(prefix, add_special_tokens=False) if prefix else []
    unk = getattr(tokenizer, "unk_token_id", None)
    out = []
    for ident in ids:
        ctx = tokenizer.encode(prefix + ident, add_special_tokens=False)
        if ctx[: len(base)] != base or len(ctx) != len(base) + 1 or (unk is not None and ctx[-1] == unk):
            pieces = tokenizer.convert_ids_to_tokens(ctx)
            raise ValueError(
                f"identifier {ident!r} is not a single (known) token after {prefix!r} in this tokenizer "
                f"({prefix + ident!r} -> {pieces}); FIRST reads one logit per candidate, so use identifiers that "
                "are single tokens (single letters A, B, ... work for most tokenizers)."
            )
        out.append(ctx[-1])
    if len(set(out)) != len(out):
        raise ValueError(f"identifiers {ids} map to repeated token ids {out} (case-folding tokenizer?)")
    return out


def _last_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token per row (works for right or left padding)."""
    t = attention_mask.shape[1]
    pos = torch.arange(t, device=attention_mask.device).expand_as(attention_mask)
    return torch.where(attention_mask.bool(), pos, torch.full_like(pos, -1)).amax(-1)


def first_scores(
    model,
    input_ids: torch.Tensor,
    identifier_ids: Sequence[int],
    *,
    attention_mask=None,
    positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """Identifier logits ``[B, m]`` of the next token at ``positions`` (default: each row's last real token).

    One forward pass; gradients flow when called in a training step.
    """
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    if positions is None:
        positions = _last_positions(attention_mask)
    rows = torch.arange(input_ids.shape[0], device=logits.device)
    ident = torch.as_tensor(list(identifier_ids), device=logits.device)
    return logits[rows, positions.to(logits.device)][:, ident].float()


@torch.no_grad()
def first_rerank(
    model,
    tokenizer,
    query: str,
    passages: Sequence[str],
    *,
    identifiers: Sequence[str] | None = None,
    max_passage_words: int | None = None,
) -> tuple[list[int], torch.Tensor]:
    """Rank ``passages`` for ``query`` from one forward pass. Returns ``(order, scores)``: ``order`` lists passage
    indices best first (ties: lower index first), ``scores`` the identifier logits."""
    ids = list(identifiers or DEFAULT_IDENTIFIERS)[: len(passages)]
    tok_ids = identifier_token_ids(tokenizer, ids)
    prompt = build_listwise_prompt(query, passages, identifiers=ids, max_passage_words=max_passage_words)
    enc = tokenizer(prompt, return_tensors="pt")
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    try:
        scores = first_scores(
            model, enc["input_ids"].to(device), tok_ids, attention_mask=enc["attention_mask"].to(device)
        )[0].cpu()
    finally:
        model.train(was)
    order = torch.sort(scores.double(), descending=True, stable=True).indices.tolist()
    return order, scores


def sliding_window_rerank(
    rank_window: Callable[[Sequence[int]], list[int]], num_candidates: int, *, window: int = 20, stride: int = 10
) -> list[int]:
    """Back-to-front sliding-window listwise reranking of candidates ``0..num_candidates-1`` (initial order).

    ``rank_window(indices)`` returns the given candidate indices reordered best first (e.g. a closure over
    :func:`first_rerank`). Each window moves its best candidates forward; with ``stride < window`` the best items
    bubble to the top of the list.
    """
    if not 0 < stride <= window:
        raise ValueError(f"need 0 < stride <= window, got stride={stride}, window={window}")
    order = list(range(num_candidates))
    end = num_candidates
    start = max(0, end - window)
    while True:
        chunk = order[start:end]
        ranked = list(rank_window(chunk))
        if sorted(ranked) != sorted(chunk):
            raise ValueError("rank_window must return a permutation of the indices it was given")
        order[start:end] = ranked
        if start == 0:
            return order
        end -= stride
        start = max(0, end - window)


@dataclass
class FirstExample:
    input_ids: list[int]
    labels: list[int]
    score_position: int
    target_ranks: list[int]


def first_training_example(
    tokenizer,
    query: str,
    passages: Sequence[str],
    target_order: Sequence[int],
    *,
    identifiers: Sequence[str] | None = None,
    max_passage_words: int | None = None,
) -> FirstExample:
    """Prompt + target permutation for the joint LM + ranking loss.

    Target text ``"C] > [A] > [B]"`` + EOS (the ``"["`` is the prompt's last token); prompt tokens get label
    ``-100``. ``score_position`` is the index whose logits predict the first identifier (the last prompt token).
    ``target_ranks[i]`` is passage ``i``'s 1-based target rank.
    """
    ids = list(identifiers or DEFAULT_IDENTIFIERS)[: len(passages)]
    order = [int(i) for i in target_order]
    if sorted(order) != list(range(len(passages))):
        raise ValueError(f"target_order {order} must be a permutation of the {len(passages)} passage indices")
    tok_ids = identifier_token_ids(tokenizer, ids)
    prompt_ids = tokenizer(
        build_listwise_prompt(query, passages, identifiers=ids, max_passage_words=max_passage_words)
    )["input_ids"]
    target = "] > [".join(ids[i] for i in order) + "]"
    target_ids = tokenizer.encode(target, add_special_tokens=False)
    if tokenizer.eos_token_id is not None:
        target_ids = target_ids + [tokenizer.eos_token_id]
    if target_ids[0] != tok_ids[order[0]]:
        raise ValueError(
            "the target's first token is not the top identifier's token; this tokenizer merges the "
            "identifier with the following ']' - use identifier_token_ids() to pick identifiers"
        )
    ranks, _ = ranks_from_order([order], len(passages))
    return FirstExample(
        list(prompt_ids) + target_ids,
        [IGNORE_INDEX] * len(prompt_ids) + target_ids,
        len(prompt_ids) - 1,
        ranks[0].tolist(),
    )


def collate_first(examples: Sequence[FirstExample], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch: ``input_ids``, ``attention_mask``, ``labels``, ``score_positions``, ``target_ranks`` and
    ``candidate_mask`` (lists may have different numbers of candidates)."""
    t = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), t), pad_token_id, dtype=torch.long)
    am = torch.zeros((len(examples), t), dtype=torch.long)
    lab = torch.full((len(examples), t), IGNORE_INDEX, dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        am[i, :n] = 1
        lab[i, :n] = torch.tensor(e.labels)
    ranks, cmask = pad_candidates([e.target_ranks for e in examples], dtype=torch.long)
    return {
        "input_ids": ids,
        "attention_mask": am,
        "labels": lab,
        "score_positions": torch.tensor([e.score_position for e in examples]),
        "target_ranks": ranks,
        "candidate_mask": cmask,
    }


def first_model_loss(
    model,
    batch: dict[str, torch.Tensor],
    identifier_ids: Sequence[int],
    *,
    rank_weight: float = 10.0,
    weighted: bool = True,
    return_parts: bool = False,
):
    """FIRST's joint loss from one forward pass of ``model`` on a :func:`collate_first` batch."""
    device = next(model.parameters()).device
    b = {k: v.to(device) for k, v in batch.items()}
    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    m = b["target_ranks"].shape[1]
    ident = torch.as_tensor(list(identifier_ids)[:m], device=device)
    rows = torch.arange(logits.shape[0], device=device)
    z = logits[rows, b["score_positions"]][:, ident]
    return first_joint_loss(
        logits[:, :-1],
        b["labels"][:, 1:],
        z,
        b["target_ranks"],
        mask=b["candidate_mask"],
        rank_weight=rank_weight,
        weighted=weighted,
        return_parts=return_parts,
    )
