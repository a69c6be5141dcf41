"""On-policy distillation data: a batch's completions replaced by completions generated from its prompts.

Generalized knowledge distillation (GKD; Agarwal et al., "On-Policy Distillation of Language Models: Learning from
Self-Generated Mistakes", ICLR 2024) trains the student on sequences it generated itself, scored token by token by
the teacher; DistillSpec (Zhou et al., ICLR 2024) finds this on-policy data the best for speculative-decoding
drafts. Sequence-level KD (Kim & Rush, 2016) trains on the teacher's generations instead. With probability
``lmbda`` per training micro-batch, :class:`OnPolicySampler` replaces the batch by

    prompt (kept as it is) + a completion sampled from the student (``on_policy_source="student"``) or the teacher
    (``"teacher"``) at ``generation_temperature`` / ``generation_top_p``, at most ``max_new_tokens`` long,

(``"student_or_teacher"``, TRL ``GKDTrainer``'s ``seq_kd=True``: every micro-batch is generated, by the student with
probability ``lmbda``, else by the teacher; the dataset's completions are never used)

and the distillation terms are computed on that batch as on any other (the engine does not care where a batch came
from). Framework-agnostic: the Hugging Face adapter (``DistillationCallback``) calls it with the Trainer's step, seed
and process rank.

**Where the prompt ends.** The prompt of a row is its leading attended tokens before the first completion token:

* ``prompt_mask`` in the batch (1 on prompt tokens; they must be the leading attended tokens), else
* ``completion_mask`` (1 on completion tokens, as TRL's ``SFTTrainer`` collator emits), else
* ``labels``: the leading span of ``-100`` (a completion-only collator: TRL's prompt-completion datasets with
  ``completion_only_loss``, or ``DataCollatorForCompletionOnlyLM``-style labels).

A batch without such a split (no labels, or a row labelled from its first token) raises: there is no prompt to
generate from.

**The new batch.** ``input_ids`` = prompt + completion, padded on the input batch's side (detected from its
``attention_mask``: rows starting with padding mean left padding); ``attention_mask`` 1 on both; ``labels`` = the
completion tokens, ``-100`` on the prompt and on padding. A completion ends at its first EOS (one of
``eos_token_id``): the EOS is kept as a label, the tokens after it are dropped. ``prompt_mask`` /
``completion_mask`` / ``position_ids`` / ``token_type_ids``, when present, are rebuilt for the new tokens; any other
per-token key raises (it described the dataset's tokens); other keys are kept.

**Generation.** ``generate`` runs under ``torch.no_grad()`` with ``use_cache=True`` on the unwrapped model (DDP:
each process generates for its own micro-batch), the student switched to eval mode and every sub-module's mode
restored afterwards; the teacher generates through :class:`~kd_plugins.distill.teacher.Teacher` (frozen, eval,
``no_grad``, on its own device). Sampling draws from the model's softmax at ``temperature`` with ``top_p``; other
logits processors a checkpoint's ``generation_config`` may set (top-k, repetition penalty, n-gram blocking, minimum
length, typical / epsilon / eta sampling) are neutralised, so the completions follow ``p^(1/T)`` (nucleus-cut).

**Seeds.** Micro-batch ``m`` of optimizer step ``s`` draws ``u ~ U[0, 1)`` from a dedicated ``torch.Generator``
seeded with ``SeedSequence([seed, s, m, 0])`` and generates when ``u < lmbda``; the draw omits the process rank, so
under DDP every process generates at the same micro-batches (no process waits for another's generation at the
gradient all-reduce). Generation itself samples from the global RNG forked and seeded with ``SeedSequence([seed, s,
m, 1 + rank])``: runs are reproducible, processes draw different samples, and the training's own RNG stream
(dropout, shuffling) is the same with or without on-policy data.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from .._utils import model_device, unwrap_model
from ..losses._common import IGNORE_INDEX
from .cache import TeacherCache
from .teacher import Teacher

__all__ = [
    "ON_POLICY_SOURCES",
    "PromptSplit",
    "OnPolicyBatch",
    "OnPolicySampler",
    "split_prompts",
    "detect_padding_side",
    "left_pad",
    "completion_lengths",
    "assemble_batch",
    "generate_completions",
    "on_policy_batch",
    "special_token_ids",
    "derive_seed",
    "seeded_rng",
    "sampling_kwargs",
]

#: Who generates the completions: the student (on-policy GKD / DistillSpec) or the teacher (sequence-level KD).
ON_POLICY_SOURCES = ("student", "teacher")
#: Per-token keys rebuilt for the new tokens; any other per-token key of the batch raises.
_REBUILT_KEYS = ("input_ids", "attention_mask", "labels", "prompt_mask", "completion_mask", "position_ids")
_ZEROED_KEYS = ("token_type_ids",)
#: Logits processors a checkpoint's generation_config may switch on, set to their neutral values.
_NEUTRAL_PROCESSORS = {
    "top_k": 0,
    "typical_p": 1.0,
    "repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "min_length": 0,
    "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0,
}
_SAMPLING_ONLY = ("top_k", "typical_p", "epsilon_cutoff", "eta_cutoff")
_NO_SPLIT_FIX = (
    "On-policy distillation (lmbda > 0) keeps each row's prompt and generates its completion, so the batch must say "
    "where the prompt ends: use a prompt-completion dataset (TRL's prompt-completion format with "
    "completion_only_loss, or DataCollatorForCompletionOnlyLM-style labels: -100 on the prompt tokens), or put a "
    "'prompt_mask' / 'completion_mask' in the batch; or set lmbda=0."
)


@dataclass
class PromptSplit:
    """The prompts of a batch: one 1-D id tensor per row, and the side the batch is padded on."""

    prompts: list[torch.Tensor]
    padding_side: str


@dataclass
class OnPolicyBatch:
    """What :func:`on_policy_batch` returns: the new batch, the generated completion tokens it labels (EOS included,
    padding and tokens after an EOS excluded) in all and per row."""

    batch: dict[str, Any]
    generated_tokens: int
    completion_lengths: torch.Tensor


# ------------------------------------------------------------------------------------------------- batch layout
def detect_padding_side(attention_mask: torch.Tensor | None, default: str = "right") -> str:
    """``"left"`` when some row starts with padding, ``"right"`` when some row ends with it, else ``default``."""
    if attention_mask is None:
        return default
    am = attention_mask.bool()
    real = am.any(1)
    left, right = bool((~am[:, 0] & real).any()), bool((~am[:, -1] & real).any())
    if left and right:
        raise ValueError(
            "the batch's attention_mask has rows starting with padding and rows ending with it; pad every row on "
            "the same side (tokenizer.padding_side = 'left' or 'right')"
        )
    return "left" if left else "right" if right else default


def split_prompts(batch: Mapping[str, Any], default_padding_side: str = "right") -> PromptSplit:
    """The prompt of every row (see the module docstring for the rule) and the batch's padding side."""
    ids = batch.get("input_ids")
    if not torch.is_tensor(ids) or ids.dim() != 2:
        raise ValueError(f"an on-policy batch needs 'input_ids' of shape [B, T]; got {type(ids).__name__}")
    am = batch.get("attention_mask")
    attended = am.bool() if am is not None else torch.ones_like(ids, dtype=torch.bool)
    if batch.get("prompt_mask") is not None:
        source, is_prompt = "prompt_mask", batch["prompt_mask"].bool() & attended
        leading = (torch.cumsum((~is_prompt & attended).int(), 1) == 0) & attended
        if not torch.equal(leading, is_prompt):
            raise ValueError(
                "prompt_mask must mark the leading attended tokens of each row (the prompt before its completion)"
            )
    else:
        if batch.get("completion_mask") is not None:
            source, completion = "completion_mask", batch["completion_mask"].bool()
        elif batch.get("labels") is not None:
            source, completion = "labels", batch["labels"] != IGNORE_INDEX
        else:
            raise ValueError(f"This batch has no labels, prompt_mask or completion_mask. {_NO_SPLIT_FIX}")
        is_prompt = (torch.cumsum((completion & attended).int(), 1) == 0) & attended
    empty = (is_prompt.sum(1) == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(
            f"Rows {empty[:8]} of this batch have no prompt (their {source} mark a completion from the first "
            f"token): the batch has no prompt/completion split. {_NO_SPLIT_FIX}"
        )
    prompts = [ids[i][is_prompt[i]] for i in range(ids.shape[0])]
    return PromptSplit(prompts=prompts, padding_side=detect_padding_side(am, default_padding_side))


def left_pad(sequences: Sequence[torch.Tensor], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` ``[B, max_len]`` of 1-D id tensors, padded on the left (how decoder-only
    models generate in batches)."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_token_id, dtype=sequences[0].dtype, device=sequences[0].device)
    mask = torch.zeros((len(sequences), width), dtype=torch.long, device=sequences[0].device)
    for i, s in enumerate(sequences):
        if len(s):
            ids[i, width - len(s) :] = s
            mask[i, width - len(s) :] = 1
    return ids, mask


def completion_lengths(completions: torch.Tensor, eos_token_id: int | Sequence[int] | None) -> torch.Tensor:
    """Tokens kept per row of generated ``completions [B, N]``: up to and including the first EOS, else all ``N``."""
    n = completions.shape[1]
    eos = _id_list(eos_token_id)
    if not eos or n == 0:
        return torch.full((completions.shape[0],), n, dtype=torch.long, device=completions.device)
    is_eos = torch.isin(completions, torch.tensor(eos, device=completions.device))
    first = torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, torch.full_like(is_eos[:, 0], n, dtype=torch.long))
    return first.long()


def assemble_batch(
    batch: Mapping[str, Any],
    prompts: Sequence[torch.Tensor],
    completions: torch.Tensor,
    lengths: torch.Tensor,
    *,
    pad_token_id: int,
    padding_side: str = "right",
) -> dict[str, Any]:
    """The batch of rows ``prompt_i + completions[i, :lengths[i]]`` padded on ``padding_side``, with ``labels`` on
    the completion only; the other keys of ``batch`` are kept or rebuilt (see the module docstring)."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    old = batch["input_ids"]
    rows = [torch.cat([p, c[:n].to(p.device, p.dtype)]) for p, c, n in zip(prompts, completions, lengths.tolist())]
    width, device = max(len(r) for r in rows), old.device
    ids = torch.full((len(rows), width), pad_token_id, dtype=old.dtype, device=device)
    labels = torch.full_like(ids, IGNORE_INDEX)
    attended = torch.zeros_like(ids, dtype=torch.bool)
    is_prompt = torch.zeros_like(attended)
    for i, (row, prompt) in enumerate(zip(rows, prompts)):
        start = width - len(row) if padding_side == "left" else 0
        ids[i, start : start + len(row)] = row
        attended[i, start : start + len(row)] = True
        is_prompt[i, start : start + len(prompt)] = True
        labels[i, start + len(prompt) : start + len(row)] = row[len(prompt) :]
    out = {k: v for k, v in batch.items() if k not in _REBUILT_KEYS + _ZEROED_KEYS}
    for key, value in out.items():
        if torch.is_tensor(value) and value.dim() >= 2 and value.shape[:2] == old.shape:
            raise ValueError(
                f"batch key {key!r} has one entry per token of the dataset's completion, which an on-policy batch "
                "replaces; drop it from the collator (or set lmbda=0)"
            )
    am = batch.get("attention_mask")
    out.update(input_ids=ids, labels=labels, attention_mask=attended.to(am.dtype if am is not None else torch.long))
    for key, mask in (("prompt_mask", is_prompt), ("completion_mask", attended & ~is_prompt)):
        if batch.get(key) is not None:
            out[key] = mask.to(batch[key].dtype)
    if batch.get("position_ids") is not None:  # as generate numbers left-padded rows
        out["position_ids"] = (attended.long().cumsum(1) - 1).clamp(min=0).to(batch["position_ids"].dtype)
    if batch.get("token_type_ids") is not None:
        out["token_type_ids"] = torch.zeros_like(ids, dtype=batch["token_type_ids"].dtype)
    return out


# --------------------------------------------------------------------------------------------------- generation
def derive_seed(*parts: int) -> int:
    """A 63-bit seed mixed from integers with NumPy's ``SeedSequence`` (nearby inputs give unrelated seeds)."""
    state = np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


@contextlib.contextmanager
def seeded_rng(seed: int, device: torch.device) -> Iterator[None]:
    """Context manager: the global RNG (CPU and ``device`` when CUDA) seeded with ``seed`` inside, restored on exit."""
    cuda = device.type == "cuda"
    index = (device.index if device.index is not None else torch.cuda.current_device()) if cuda else None
    with torch.random.fork_rng(devices=[index] if cuda else []):
        torch.default_generator.manual_seed(seed)
        if cuda:
            torch.cuda.default_generators[index].manual_seed(seed)
        yield


def _in_eval_mode(module: nn.Module, fn: Callable[[nn.Module], Any]) -> Any:
    """``fn(module)`` in eval mode under ``no_grad``; every sub-module's train/eval flag is restored afterwards."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        with torch.no_grad():
            return fn(module)
    finally:
        for m, training in modes:
            m.training = training


def sampling_kwargs(temperature: float, top_p: float) -> dict[str, Any]:
    """``generate`` arguments that sample from ``softmax(logits / temperature)`` cut to nucleus ``top_p``
    (``temperature=0``: greedy), with the other logits processors a ``generation_config`` may enable neutralised."""
    if temperature == 0:  # greedy: the sampling-only warpers at their defaults, so generate does not warn about them
        neutral = {k: v for k, v in _NEUTRAL_PROCESSORS.items() if k not in _SAMPLING_ONLY}
        return {"do_sample": False, "temperature": 1.0, "top_p": 1.0, "top_k": None, **neutral}
    return {"do_sample": True, "temperature": float(temperature), "top_p": float(top_p), **_NEUTRAL_PROCESSORS}


def generate_completions(
    generator: nn.Module | Teacher,
    prompts: Sequence[torch.Tensor],
    *,
    pad_token_id: int,
    eos_token_id: int | Sequence[int] | None,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int | None = None,
) -> torch.Tensor:
    """Completions ``[B, N]`` (``N <= max_new_tokens``; rows that stopped are padded) sampled from ``generator`` (a
    model, DDP-wrapped or not, or a :class:`Teacher`) after the left-padded ``prompts``. ``temperature=0``: greedy.
    ``seed``: the global RNG is forked and seeded for the call (``None``: not touched)."""
    if isinstance(generator, Teacher):
        module, run = generator.module, generator.run
        device = generator.device
    else:
        module = unwrap_model(generator)
        device = model_device(module)
        run = lambda fn: _in_eval_mode(module, fn)  # noqa: E731
    if not hasattr(module, "generate"):
        raise TypeError(f"{type(module).__name__} has no generate(); on-policy data needs a causal LM to sample from")
    ids, mask = left_pad([p.to(device) for p in prompts], pad_token_id)
    kwargs = {
        "max_new_tokens": int(max_new_tokens),
        "pad_token_id": int(pad_token_id),
        "eos_token_id": _id_list(eos_token_id) or None,
        "use_cache": True,
        "return_dict_in_generate": False,
        **sampling_kwargs(temperature, top_p),
    }
    with seeded_rng(seed, device) if seed is not None else contextlib.nullcontext():
        out = run(lambda m: m.generate(input_ids=ids, attention_mask=mask, **kwargs))
    sequences = out.sequences if hasattr(out, "sequences") else out
    return sequences[:, ids.shape[1] :]


def on_policy_batch(
    batch: Mapping[str, Any],
    generator: nn.Module | Teacher,
    *,
    pad_token_id: int,
    eos_token_id: int | Sequence[int] | None = None,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int | None = None,
    padding_side: str | None = None,
    default_padding_side: str = "right",
) -> OnPolicyBatch:
    """``batch`` with every row's completion replaced by one ``generator`` samples after its prompt.

    Args:
        batch: a causal-LM batch with a prompt/completion split (``labels`` with ``-100`` on the prompt, or a
            ``prompt_mask`` / ``completion_mask``); see the module docstring.
        generator: the model that samples (the student, possibly DDP-wrapped) or a :class:`Teacher`.
        pad_token_id: the id padding the new batch and the prompts given to ``generate``.
        eos_token_id: the id(s) that end a completion (kept as its last label); ``None``: the generating model's
            ``generation_config.eos_token_id``.
        max_new_tokens / temperature / top_p: generation length and sampling (``temperature=0``: greedy).
        seed: seeds the forked global RNG for the sampling (``None``: the global RNG as it is).
        padding_side: of the new batch; ``None``: the input batch's (``default_padding_side`` when it has none).
    """
    split = split_prompts(batch, default_padding_side)
    module = generator.module if isinstance(generator, Teacher) else unwrap_model(generator)
    if eos_token_id is None:
        eos_token_id = getattr(getattr(module, "generation_config", None), "eos_token_id", None)
    completions = generate_completions(
        generator,
        split.prompts,
        pad_token_id=pad_token_id,
        eos_token_id=eos_token_id,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
    )
    completions = completions.to(batch["input_ids"].device)
    lengths = completion_lengths(completions, eos_token_id)
    new = assemble_batch(
        batch,
        split.prompts,
        completions,
        lengths,
        pad_token_id=pad_token_id,
        padding_side=padding_side or split.padding_side,
    )
    return OnPolicyBatch(batch=new, generated_tokens=int(lengths.sum()), completion_lengths=lengths)


def _id_list(value: int | Sequence[int] | torch.Tensor | None) -> list[int]:
    if value is None:
        return []
    if torch.is_tensor(value):
        return [int(v) for v in value.flatten().tolist()]
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value]
    return [int(value)]


def special_token_ids(
    tokenizer: Any = None,
    model: nn.Module | None = None,
    *,
    pad_token_id: int | None = None,
    eos_token_id: int | Sequence[int] | None = None,
) -> tuple[int, list[int] | None]:
    """``(pad_token_id, eos_token_ids)`` for generation; given ids win. EOS: the ids of the tokenizer and of the
    model's ``generation_config`` together (``None`` when neither has one). Pad: the tokenizer's, else the model's
    ``generation_config`` / ``config``'s, else the first EOS id."""
    tok = getattr(tokenizer, "tokenizer", tokenizer)  # a processor holds its tokenizer
    gen_cfg = getattr(model, "generation_config", None)
    if eos_token_id is not None:
        eos = _id_list(eos_token_id)
    else:
        eos = _id_list(getattr(tok, "eos_token_id", None)) + _id_list(getattr(gen_cfg, "eos_token_id", None))
        eos = list(dict.fromkeys(eos))  # in order, without repeats
    candidates = (
        pad_token_id,
        getattr(tok, "pad_token_id", None),
        getattr(gen_cfg, "pad_token_id", None),
        getattr(getattr(model, "config", None), "pad_token_id", None),
    )
    pad = next((_id_list(c)[0] for c in candidates if _id_list(c)), eos[0] if eos else None)
    if pad is None:
        raise ValueError(
            "On-policy generation needs a pad token id and found none (tokenizer, generation_config, config) and no "
            "EOS id to use instead; set tokenizer.pad_token = tokenizer.eos_token, or model.generation_config."
            "pad_token_id"
        )
    return pad, eos or None


# ------------------------------------------------------------------------------------------------------ sampler
class OnPolicySampler:
    """Replaces a training micro-batch's completions by generated ones with probability ``config.lmbda``.

    Args:
        config: a :class:`~kd_plugins.distill.config.DistillationConfig` (``lmbda``, ``on_policy_source``,
            ``generation_temperature``, ``generation_top_p``, ``max_new_tokens``, ``on_policy_seed``).
        teacher: the teacher (a module or its :class:`Teacher`), needed unless ``on_policy_source="student"``; a
            :class:`~kd_plugins.distill.cache.TeacherCache` is refused when ``lmbda > 0`` (it holds no outputs for
            generated text).

    Calling it with ``(model, batch, step=..., seed=..., rank=..., tokenizer=...)`` returns ``(batch, logs)``:
    the batch itself (``lmbda == 0``, or the draw said no) or the on-policy batch, and ``{"on_policy_fraction": 0 or
    1, "generated_tokens": n}`` (empty with ``lmbda == 0``; with ``on_policy_source="student_or_teacher"`` every
    batch is generated and ``"student_generated_fraction": 0 or 1`` says by whom). Micro-batches are counted per
    ``step`` for the seeds.
    """

    def __init__(self, config, teacher: nn.Module | Teacher | TeacherCache | None = None):
        self.config = config
        if config.lmbda > 0 and isinstance(teacher, TeacherCache):
            raise ValueError(
                f"lmbda={config.lmbda} generates new completions, for which a TeacherCache holds no teacher outputs; "
                "pass the teacher model instead of its cache, or set lmbda=0."
            )
        if isinstance(teacher, nn.Module):
            teacher = Teacher(teacher, device=config.teacher_device, dtype=config.teacher_dtype)
        self.teacher = teacher if isinstance(teacher, Teacher) else None
        if config.lmbda > 0 and config.on_policy_source != "student" and self.teacher is None:
            raise ValueError(
                f"on_policy_source={config.on_policy_source!r} needs the teacher model (sequence-level KD generates "
                "with it)"
            )
        self._step: int | None = None
        self._micro = -1

    @classmethod
    def from_engine(cls, engine) -> OnPolicySampler:
        """The sampler of a :class:`~kd_plugins.distill.engine.DistillationEngine` (its config and its teacher)."""
        return cls(engine.config, engine.cache if engine.cache is not None else engine.runner)

    def _next_micro(self, step: int) -> int:
        if step != self._step:
            self._step, self._micro = step, -1
        self._micro += 1
        return self._micro

    def draw(self, step: int, micro: int, seed: int) -> bool:
        """Whether micro-batch ``micro`` of optimizer step ``step`` is generated (the same on every process)."""
        g = torch.Generator().manual_seed(derive_seed(seed, step, micro, 0))
        return bool(torch.rand((), generator=g) < self.config.lmbda)

    def __call__(
        self, model: nn.Module, batch: Mapping[str, Any], *, step: int, seed: int = 0, rank: int = 0, tokenizer=None
    ) -> tuple[Mapping[str, Any], dict[str, float]]:
        cfg = self.config
        if cfg.lmbda <= 0:
            return batch, {}
        seed = cfg.on_policy_seed if cfg.on_policy_seed is not None else seed
        side = getattr(getattr(tokenizer, "tokenizer", tokenizer), "padding_side", None) or "right"
        split_prompts(batch, side)  # a batch without a prompt/completion split fails on its first step, drawn or not
        micro = self._next_micro(step)
        drawn = self.draw(step, micro, seed)
        logs = {}
        if cfg.on_policy_source == "student_or_teacher":
            # Every micro-batch is generated; the draw only picks who generates.
            generator = model if drawn else self.teacher
            logs["student_generated_fraction"] = float(drawn)
        elif not drawn:
            return batch, {"on_policy_fraction": 0.0, "generated_tokens": 0.0}
        else:
            generator = self.teacher if cfg.on_policy_source == "teacher" else model
        module = generator.module if isinstance(generator, Teacher) else unwrap_model(generator)
        pad, eos = special_token_ids(tokenizer, module)
        out = on_policy_batch(
            batch,
            generator,
            pad_token_id=pad,
            eos_token_id=eos if eos is not None else [],
            max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.generation_temperature,
            top_p=cfg.generation_top_p,
            seed=derive_seed(seed, step, micro, 1 + rank),
            default_padding_side=side,
        )
        return out.batch, {"on_policy_fraction": 1.0, "generated_tokens": float(out.generated_tokens), **logs}
