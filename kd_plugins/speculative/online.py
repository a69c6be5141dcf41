"""Online draft distillation (SpecVLM-style): train the draft on what the target outputs while it generates.

SpecVLM (2025) keeps training an EAGLE-style draft while the target serves: the target's logits and its top-layer
features (the hidden state its LM head reads, EAGLE's "second-to-top-layer features") are collected during
generation, and the draft learns from them with a classification term and a feature regression term::

    L = CE(softmax(z_target / T), draft) + feature_weight * SmoothL1(W h_draft, h_target)

``CE(p, q) = -sum_v p_v log q_v`` (forward KL plus the constant target entropy) at every generated position, ``h``
the features fed to the LM heads at that position, ``W`` a learned linear projector when the widths differ (the
identity otherwise). EAGLE weighs the terms 1 (features) : 0.1 (classification), i.e. ``feature_weight = 10`` here.
The draft here is an ordinary causal LM (for example :func:`~kd_plugins.speculative.build_draft`), not an EAGLE head
reading the target's features: the feature term pulls its own top-layer states towards the target's.

* :func:`collect_target_outputs`: the target generates from prompts (through
  :class:`~kd_plugins.distill.teacher.Teacher`); the raw logits of every generated position (``output_logits``) and
  the LM head's input (a forward hook) are kept, full or as top-k, with the sequences.
* :func:`online_draft_loss`: the loss above on a draft forward over those sequences.
* :func:`train_draft_online`: the loop (collect a batch, one optimizer step on the draft) for ``steps`` steps.

With top-k logits the target distribution is the softmax of the ``k`` kept logits (renormalised over them).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._utils import model_device
from ..distill.onpolicy import completion_lengths, derive_seed, left_pad, sampling_kwargs, seeded_rng, special_token_ids
from ..distill.teacher import Teacher
from .vocab import check_same_vocabulary

__all__ = [
    "TargetOutputs",
    "OnlineDraftLoss",
    "OnlineDraftRun",
    "collect_target_outputs",
    "online_draft_loss",
    "train_draft_online",
]


@dataclass
class TargetOutputs:
    """The target's outputs over one batch of its own generations.

    Attributes:
        input_ids / attention_mask / position_ids: ``[B, P + N]``: left-padded prompts and the generated tokens (cut
            after the first EOS, padding after it); ``position_ids`` number each row from its first real token, as
            ``generate`` did.
        start: the position whose output predicts the first generated token (``P - 1``); generated token ``k`` is
            predicted at ``start + k``.
        target_mask: ``[B, N]``, the generated positions that count (up to and including the first EOS).
        logits: ``[B, N, V]`` raw target logits, or ``None`` when top-k was kept.
        topk: ``(values [B, N, k], indices [B, N, k])`` of the raw logits, or ``None``.
        features: ``[B, N, H]``, the target's LM-head inputs.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    start: int
    target_mask: torch.Tensor
    features: torch.Tensor
    logits: torch.Tensor | None = None
    topk: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def num_generated(self) -> int:
        return self.target_mask.shape[1]

    def to(self, device: torch.device | str) -> TargetOutputs:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        topk = None if self.topk is None else (move(self.topk[0]), move(self.topk[1]))
        return TargetOutputs(
            *(move(t) for t in (self.input_ids, self.attention_mask, self.position_ids)),
            start=self.start,
            target_mask=move(self.target_mask),
            features=move(self.features),
            logits=move(self.logits),
            topk=topk,
        )

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """What the draft's forward takes."""
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask, "position_ids": self.position_ids}


@dataclass
class OnlineDraftLoss:
    """The online loss and its two terms (means over the generated positions)."""

    loss: torch.Tensor
    ce: torch.Tensor
    feature: torch.Tensor


@dataclass
class OnlineDraftRun:
    """What :func:`train_draft_online` returns: one ``{"step", "loss", "ce", "feature", "tokens"}`` per step, and the
    projector it trained (``None`` when draft and target have the same width)."""

    history: list[dict[str, float]] = field(default_factory=list)
    projector: nn.Module | None = None


def _prompt_ids(prompts: Sequence, tokenizer) -> list[torch.Tensor]:
    if not prompts:
        raise ValueError("no prompts given: pass at least one prompt (token ids, or text with a tokenizer)")
    out = []
    for p in prompts:
        if isinstance(p, str):
            if tokenizer is None:
                raise ValueError("text prompts need tokenizer=...; or pass token ids")
            p = tokenizer(p, add_special_tokens=False)["input_ids"]
        t = torch.as_tensor(p, dtype=torch.long).flatten()
        if t.numel() == 0:
            raise ValueError("an empty prompt: every prompt needs at least one token")
        out.append(t)
    return out


def collect_target_outputs(
    target: nn.Module | Teacher,
    prompts: Sequence,
    *,
    max_new_tokens: int = 32,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int | None = None,
    tokenizer=None,
    pad_token_id: int | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    seed: int | None = None,
) -> TargetOutputs:
    """The target generates after ``prompts`` (token-id sequences, or text with ``tokenizer``), sampling at
    ``temperature`` / ``top_p`` (``temperature=0``: greedy); its raw logits at every generated position (all of them,
    or the ``top_k`` largest) and its LM-head inputs are kept. ``pad_token_id`` / ``eos_token_id`` default to the
    tokenizer's / the target's ``generation_config``; ``seed`` seeds the (forked) global RNG of the sampling."""
    teacher = target if isinstance(target, Teacher) else Teacher(target)
    module, device = teacher.module, teacher.device
    pad, eos = special_token_ids(tokenizer, module, pad_token_id=pad_token_id, eos_token_id=eos_token_id)
    ids, mask = left_pad([p.to(device) for p in _prompt_ids(prompts, tokenizer)], pad)
    features: list[torch.Tensor] = []
    hook = module.get_output_embeddings().register_forward_hook(lambda m, a, o: features.append(a[0][:, -1]))
    kwargs = dict(max_new_tokens=int(max_new_tokens), pad_token_id=int(pad), eos_token_id=eos, use_cache=True)
    try:
        with seeded_rng(seed, device) if seed is not None else contextlib.nullcontext():
            out = teacher.run(
                lambda m: m.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    output_logits=True,
                    return_dict_in_generate=True,
                    **kwargs,
                    **sampling_kwargs(temperature, top_p),
                )
            )
    finally:
        hook.remove()
    logits = torch.stack(out.logits, 1).float()
    if len(features) != logits.shape[1]:
        raise RuntimeError(
            f"the target's LM head ran {len(features)} times for {logits.shape[1]} generated tokens; "
            "collect_target_outputs needs one head call per generation step"
        )
    return _pack(out.sequences, mask, logits, torch.stack(features, 1).float(), eos, pad, top_k)


def _pack(sequences, prompt_mask, logits, features, eos, pad, top_k) -> TargetOutputs:
    prompt_len = prompt_mask.shape[1]
    completion = sequences[:, prompt_len:]
    lengths = completion_lengths(completion, eos)
    valid = torch.arange(completion.shape[1], device=completion.device)[None] < lengths[:, None]
    ids = torch.cat([sequences[:, :prompt_len], completion.masked_fill(~valid, pad)], 1)
    attention = torch.cat([prompt_mask, valid.long()], 1)
    positions = (attention.cumsum(1) - 1).clamp(min=0)
    topk = None
    if top_k is not None:
        values, indices = logits.topk(min(int(top_k), logits.shape[-1]), dim=-1)
        topk, logits = (values, indices), None
    return TargetOutputs(ids, attention, positions, prompt_len - 1, valid, features, logits=logits, topk=topk)


def online_draft_loss(
    draft_outputs: Any,
    buffer: TargetOutputs,
    *,
    feature_weight: float = 1.0,
    temperature: float = 1.0,
    projector: nn.Module | None = None,
    smooth_l1_beta: float = 1.0,
) -> OnlineDraftLoss:
    """``CE(softmax(z_target / T), softmax(z_draft / T)) + feature_weight * SmoothL1(projector(h_draft), h_target)``
    averaged over ``buffer.target_mask``. ``draft_outputs``: the draft's outputs on ``buffer.model_inputs()`` with
    ``output_hidden_states=True`` (``hidden_states[-1]`` is what its LM head reads). ``projector`` maps the draft's
    width to the target's; it is required when they differ."""
    s, n = buffer.start, buffer.num_generated
    d_logits = draft_outputs.logits[:, s : s + n].float()
    d_feat = draft_outputs.hidden_states[-1][:, s : s + n].float()
    buffer = buffer.to(d_logits.device)
    mask = buffer.target_mask
    log_q = F.log_softmax(d_logits / temperature, -1)
    if buffer.topk is not None:
        values, indices = buffer.topk
        ce = -(F.softmax(values / temperature, -1) * log_q.gather(-1, indices)).sum(-1)
    else:
        ce = -(F.softmax(buffer.logits / temperature, -1) * log_q).sum(-1)
    if projector is not None:
        d_feat = projector(d_feat)
    elif d_feat.shape[-1] != buffer.features.shape[-1]:
        raise ValueError(
            f"draft features have width {d_feat.shape[-1]}, the target's {buffer.features.shape[-1]}: pass "
            f"projector=nn.Linear({d_feat.shape[-1]}, {buffer.features.shape[-1]}) (train_draft_online makes one)"
        )
    feat = F.smooth_l1_loss(d_feat, buffer.features, reduction="none", beta=smooth_l1_beta).mean(-1)
    count = mask.sum().clamp(min=1)
    ce, feat = (ce * mask).sum() / count, (feat * mask).sum() / count
    return OnlineDraftLoss(loss=ce + feature_weight * feat, ce=ce, feature=feat)


def train_draft_online(
    draft: nn.Module,
    target: nn.Module | Teacher,
    prompts: Sequence,
    steps: int,
    optimizer: torch.optim.Optimizer,
    *,
    batch_size: int = 4,
    max_new_tokens: int = 32,
    sampling_temperature: float = 1.0,
    temperature: float = 1.0,
    feature_weight: float = 1.0,
    top_k: int | None = None,
    tokenizer=None,
    pad_token_id: int | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    projector: nn.Module | None = None,
    seed: int = 0,
) -> OnlineDraftRun:
    """``steps`` optimizer steps of online distillation: each takes the next ``batch_size`` prompts (cycling), lets
    the target generate (:func:`collect_target_outputs`, sampling at ``sampling_temperature``, seeded from ``seed``
    and the step; ``tokenizer`` / ``pad_token_id`` / ``eos_token_id`` as there) and steps ``optimizer`` on
    :func:`online_draft_loss`. When the widths differ and no ``projector``
    is given, a bias-free ``nn.Linear`` is created and added to ``optimizer`` as a new parameter group."""
    teacher = target if isinstance(target, Teacher) else Teacher(target)
    teacher.check_separate(draft)
    check_same_vocabulary(teacher.module, draft)
    ids = _prompt_ids(prompts, tokenizer)
    d_width, t_width = draft.get_output_embeddings().in_features, teacher.module.get_output_embeddings().in_features
    if projector is None and d_width != t_width:
        projector = nn.Linear(d_width, t_width, bias=False).to(model_device(draft))
        optimizer.add_param_group({"params": list(projector.parameters())})
    run = OnlineDraftRun(projector=projector)
    draft.train()
    for step in range(steps):
        batch = [ids[(step * batch_size + i) % len(ids)] for i in range(batch_size)]
        buffer = collect_target_outputs(
            teacher,
            batch,
            max_new_tokens=max_new_tokens,
            temperature=sampling_temperature,
            top_k=top_k,
            tokenizer=tokenizer,
            pad_token_id=pad_token_id,
            eos_token_id=eos_token_id,
            seed=derive_seed(seed, step),
        ).to(model_device(draft))
        outputs = draft(**buffer.model_inputs(), output_hidden_states=True, use_cache=False)
        loss = online_draft_loss(
            outputs, buffer, feature_weight=feature_weight, temperature=temperature, projector=projector
        )
        optimizer.zero_grad(set_to_none=True)
        loss.loss.backward()
        optimizer.step()
        run.history.append(
            {
                "step": step,
                "loss": float(loss.loss.detach()),
                "ce": float(loss.ce.detach()),
                "feature": float(loss.feature.detach()),
                "tokens": int(buffer.target_mask.sum()),
            }
        )
    return run
