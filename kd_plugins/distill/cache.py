"""``TeacherCache``: the teacher's outputs computed once over a fixed training set, reused every epoch.

A teacher *source* for the distillation core (see ``docs/conventions.md``, "Extension points"): pass a cache where a
teacher module is accepted (``DistillationEngine(cache, config)``, ``DistillationCallback(cache, config)``) and the
engine looks the batch up instead of running the teacher. Two payloads:

* ``kind="embedding"``: one pooled sentence embedding per example (bare-encoder students, ``task="encoder"``; the
  embedding terms use it in place of pooling the teacher's ``last_hidden_state``);
* ``kind="topk"``: per token, the teacher's ``top_k`` most likely tokens and their log-probabilities at
  ``temperature`` (normalised over the full vocabulary), fed to the logit losses as ``teacher_topk`` (see
  docs/losses.md, "Sparse teachers": with ``top_k`` = vocabulary size the loss equals the dense one).

Batches are matched to entries without any extra dataset column: each example is keyed by a hash of its unpadded
``input_ids`` (the ``attention_mask`` says which positions are padding, left or right), so an unmodified, shuffled,
collated dataset works. ``save_teacher_cache`` / ``load_teacher_cache`` use the kd_plugins checkpoint format
(atomic, sha256 per tensor) with fingerprints of the teacher and of the dataset in the metadata.

A ``topk`` cache too large for memory is written to disk in shards by ``kd-plugins cache-teacher`` /
:func:`kd_plugins.cache_teacher` (bit-packed indices, bf16 or head + fitted-tail values; see
``distill/cache_store.py``); ``TeacherCache(directory)`` (or ``load_teacher_cache(directory)``) streams it: only the
index stays in memory, a batch reads its rows from the shards it needs.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
import torch.nn as nn

from .._checkpoint import CheckpointSpec, read_checkpoint, tensor_sha256, write_checkpoint
from ..losses import get_loss_spec
from ..losses.feature import mean_pool
from .cache_lowrank import LowRankCoder, code_rows, rebuild_log_probs
from .cache_select import SELECTIONS, cache_rows
from .cache_store import ShardedTopKStore, is_sharded_cache
from .config import DistillationConfig
from .pairs import split_pairs
from .retokenize import retokenize
from .retokenize import teacher_max_length as teacher_max_length_of
from .teacher import Teacher

__all__ = [
    "TeacherCache",
    "build_teacher_cache",
    "save_teacher_cache",
    "load_teacher_cache",
    "example_keys",
    "tokenizer_fingerprint",
]

KINDS = ("embedding", "topk", "lowrank")
#: Tensors a ``lowrank`` cache holds (per token: the exact head and the hidden state's PCA code; once: the tail map).
_LOWRANK_TENSORS = ("keys", "offsets", "indices", "log_probs", "coefficients", "scales", "tail_bias", "tail_weight")
_KEY_BYTES = 16
_TEACHER_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
SPEC = CheckpointSpec(
    kind="teacher_cache",
    manifest_name="teacher_cache.json",
    tensor_file="teacher_cache.safetensors",
    description="a teacher cache",
    writer="save_teacher_cache",
)


# ------------------------------------------------------------------------------------------------------ keys
def example_keys(input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> list[bytes]:
    """One key per row of a ``[B, T]`` batch: a hash of the row's unpadded token ids (left or right padding)."""
    ids = input_ids.detach().to("cpu", torch.int64)
    mask = torch.ones_like(ids, dtype=torch.bool) if attention_mask is None else attention_mask.detach().cpu().bool()
    return [hashlib.blake2b(row[m].numpy().tobytes(), digest_size=_KEY_BYTES).digest() for row, m in zip(ids, mask)]


def _dataset_fingerprint(keys: Iterable[bytes]) -> str:
    h = hashlib.sha256()
    for key in sorted(keys):
        h.update(key)
    return h.hexdigest()


def teacher_fingerprint(teacher: nn.Module) -> str:
    """A hash of the teacher's config (when it has one), class, and first, middle and last weights."""
    cfg = getattr(teacher, "config", None)
    cfg_dict = cfg.to_dict() if hasattr(cfg, "to_dict") else {}
    cfg_dict = {k: v for k, v in cfg_dict.items() if k not in ("_name_or_path", "transformers_version")}
    state = list(teacher.state_dict().items())
    picks = [state[i] for i in sorted({0, len(state) // 2, len(state) - 1})] if state else []
    h = hashlib.sha256(type(teacher).__name__.encode())
    h.update(json.dumps(cfg_dict, sort_keys=True, default=str).encode())
    for name, t in picks:
        h.update(name.encode() + tensor_sha256(t).encode())
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of a tokenizer's full definition (a fast tokenizer's JSON, else its vocabulary) and special tokens."""
    tok = getattr(tokenizer, "tokenizer", tokenizer)  # a processor wraps its tokenizer
    backend = getattr(tok, "backend_tokenizer", None)
    h = hashlib.sha256(type(tok).__name__.encode())
    if backend is not None:  # truncation / padding are call settings that tokenizing changes, not the tokenizer
        definition = {k: v for k, v in json.loads(backend.to_str()).items() if k not in ("truncation", "padding")}
        h.update(json.dumps(definition, sort_keys=True).encode())
    else:
        h.update(json.dumps(sorted(tok.get_vocab().items()), default=str).encode())
    specials = getattr(tok, "special_tokens_map", {})
    h.update(json.dumps(specials, sort_keys=True, default=str).encode())
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------------ cache
class TeacherCache:
    """Teacher outputs keyed by example; built by :func:`build_teacher_cache`.

    Tensors: ``keys`` ``[N, 16]`` uint8; ``embeddings`` ``[N, D]`` (``kind="embedding"``) or ``indices`` /
    ``log_probs`` ``[R, k]`` with ``offsets`` ``[N + 1]`` (``kind="topk"``; example ``j`` owns rows
    ``offsets[j]:offsets[j + 1]``, one per unpadded token, or one row for sequence-level logits).
    ``metadata``: ``kind``, ``top_k``, ``temperature``, ``vocab_size``, ``pooling``, ``per_token``,
    ``teacher_fingerprint``, ``dataset_fingerprint``, ``num_examples``, ``teacher_class``.

    ``TeacherCache(directory)`` opens a sharded on-disk cache written by :func:`kd_plugins.cache_teacher`
    (``kd-plugins cache-teacher``) and streams it: :attr:`tensors` then holds only ``keys`` and ``offsets``,
    :attr:`store` (a :class:`~kd_plugins.distill.cache_store.ShardedTopKStore`) reads the rows of each batch lazily,
    keeping at most ``max_open_shards`` shards open and checking each shard's sha256 when it is first opened
    (``verify``). Its metadata also holds ``tokenizer_fingerprint`` and ``num_tokens``.

    Limit: a per-token cache has no row for padding, so on a left-padded causal-LM batch it skips the last pad
    position (whose next token is the first real one), which the live teacher's dense path still counts; the two
    losses then differ slightly. Right padding gives the same rows.
    """

    def __init__(
        self,
        tensors: Mapping[str, torch.Tensor] | str | os.PathLike,
        metadata: Mapping[str, Any] | None = None,
        *,
        max_open_shards: int = 4,
        verify: bool = True,
    ):
        self.store: ShardedTopKStore | None = None
        if isinstance(tensors, (str, os.PathLike)):
            self.store = ShardedTopKStore(tensors, max_open_shards=max_open_shards, verify=verify)
            tensors, metadata = self.store.index, self.store.metadata
        elif metadata is None:
            raise TypeError("TeacherCache takes (tensors, metadata) or the directory of a sharded cache")
        self.tensors = dict(tensors)
        self.metadata = dict(metadata)
        if self.kind not in KINDS:
            raise ValueError(f"TeacherCache kind must be one of {KINDS}, got {self.kind!r}")
        need = {
            "embedding": ("keys", "embeddings"),
            "topk": ("keys", "indices", "log_probs", "offsets"),
            "lowrank": _LOWRANK_TENSORS,
        }[self.kind]
        if self.store is not None:  # the rows stay in the shards; the index holds keys, offsets (and a tail map)
            need = ("keys", "offsets", "tail_bias", "tail_weight") if self.kind == "lowrank" else ("keys", "offsets")
        missing = [n for n in need if n not in self.tensors]
        if missing:
            raise ValueError(f"a {self.kind!r} TeacherCache needs the tensors {list(need)}; missing {missing}")
        self._index = {row.tobytes(): i for i, row in enumerate(self.tensors["keys"].numpy())}

    @property
    def kind(self) -> str:
        """``"embedding"``, ``"topk"`` or ``"lowrank"``."""
        return self.metadata["kind"]

    @property
    def top_k(self) -> int | None:
        return self.metadata.get("top_k")

    @property
    def temperature(self) -> float:
        return self.metadata.get("temperature")

    @property
    def vocab_size(self) -> int | None:
        """Entries per teacher logit row (vocabulary or label count) of a ``topk`` cache."""
        return self.metadata.get("vocab_size")

    @property
    def pooling(self) -> str | None:
        return self.metadata.get("pooling")

    def __len__(self) -> int:
        return len(self._index)

    def __repr__(self) -> str:
        extra = f"pooling={self.pooling}" if self.kind == "embedding" else f"top_k={self.top_k}, T={self.temperature}"
        if self.kind == "lowrank":
            extra += f", rank={self.metadata.get('rank')}"
        where = f", streaming from {self.store.directory}" if self.store is not None else ""
        return f"TeacherCache(kind={self.kind}, examples={len(self)}, {extra}{where})"

    @property
    def _rebuild_hint(self) -> str:
        if self.store is not None:
            return "Rebuild it with `kd-plugins cache-teacher` (or kd_plugins.cache_teacher)"
        return "Rebuild it with build_teacher_cache"

    def save(self, directory: str | os.PathLike, *, overwrite: bool = False) -> str:
        """Same as :func:`save_teacher_cache`."""
        return save_teacher_cache(self, directory, overwrite=overwrite)

    @classmethod
    def load(cls, directory: str | os.PathLike, **expect: Any) -> TeacherCache:
        """Same as :func:`load_teacher_cache`."""
        return load_teacher_cache(directory, **expect)

    # -------------------------------------------------------------------------------------------- checks
    def check_teacher(self, teacher: nn.Module) -> None:
        """Refuse a teacher other than the one the cache was built with (config, class and sampled weights)."""
        got = teacher_fingerprint(teacher.module if isinstance(teacher, Teacher) else teacher)
        if got != self.metadata.get("teacher_fingerprint"):
            raise ValueError(
                f"This teacher cache was built with another teacher ({self.metadata.get('teacher_class')}, "
                f"fingerprint {str(self.metadata.get('teacher_fingerprint'))[:12]}; this {type(teacher).__name__} "
                f"has {got[:12]}). {self._rebuild_hint} and this teacher."
            )

    def check_tokenizer(self, tokenizer: Any) -> None:
        """Refuse a tokenizer other than the one the cache's examples were tokenized with (recorded when the builder
        was given it: ``cache_teacher(..., tokenizer=...)``, or ``build_teacher_cache(..., student_tokenizer=...)``)."""
        self._check_fingerprint(
            "tokenizer_fingerprint",
            tokenizer,
            missing="This teacher cache records no tokenizer (it was built from already tokenized examples); "
            "it cannot be checked against a tokenizer. Check the dataset instead (dataset=...).",
            mismatch="This teacher cache was built with another tokenizer",
            consequence=": its token ids mean other tokens.",
            what="tokenizer",
        )

    def check_teacher_tokenizer(self, teacher_tokenizer: Any) -> None:
        """Refuse a teacher tokenizer other than the one a re-tokenized cache's teacher read its inputs with."""
        self._check_fingerprint(
            "teacher_tokenizer_fingerprint",
            teacher_tokenizer,
            missing="This teacher cache was not built with a teacher_tokenizer (its teacher read the student's "
            "tokens); do not pass teacher_tokenizer= to load it, or rebuild it with build_teacher_cache(..., "
            "teacher_tokenizer=..., student_tokenizer=...).",
            mismatch="This teacher cache's teacher read its inputs with another tokenizer",
            consequence=".",
            what="teacher tokenizer",
        )

    def _check_fingerprint(
        self, key: str, tokenizer: Any, *, missing: str, mismatch: str, consequence: str, what: str
    ) -> None:
        """Raise ``missing`` when the metadata lacks ``key``, ``mismatch`` when ``tokenizer``'s fingerprint differs."""
        want = self.metadata.get(key)
        if want is None:
            raise ValueError(missing)
        got = tokenizer_fingerprint(tokenizer)
        if got != want:
            raise ValueError(
                f"{mismatch} (fingerprint {want[:12]}; this {type(tokenizer).__name__} has {got[:12]}){consequence} "
                f"{self._rebuild_hint} and this {what}."
            )

    def check_temperature(self, temperature: float) -> None:
        """Refuse a loss temperature other than the capture temperature."""
        if not math.isclose(float(temperature), float(self.temperature)):
            raise ValueError(
                f"The teacher cache holds log-probs at temperature {self.temperature}, not {temperature}. "
                f"{self._rebuild_hint} at temperature={temperature} (--temperature {temperature})."
            )

    def check_dataset(self, dataset_or_batches: Any) -> None:
        """Refuse a dataset whose examples are not exactly those the cache was built over."""
        keys = [k for batch in _teacher_batches(dataset_or_batches, 64) for k in example_keys(*_ids_mask(batch))]
        got = _dataset_fingerprint(set(keys))
        if got != self.metadata.get("dataset_fingerprint"):
            missing = sum(k not in self._index for k in set(keys))
            raise ValueError(
                f"This teacher cache was built over another dataset ({self.metadata.get('num_examples')} examples; "
                f"this one has {len(set(keys))}, {missing} of them not in the cache). {self._rebuild_hint} over "
                "the same dataset, tokenizer and max_length."
            )

    def check_fits(self, task: str, config: DistillationConfig, student_vocab: int | None) -> None:
        """Refuse a config whose terms need teacher outputs this cache does not hold (called by the engine)."""
        kinds = config.kinds
        wanted = {"embedding": "embedding", "topk": "logits", "lowrank": "logits"}[self.kind]
        served = ("embedding", "pair") if self.kind == "embedding" else ("logits",)  # pair terms use embeddings too
        other = sorted(n for n, k in kinds.items() if k not in served)
        if other or config.feature_pairs:
            raise ValueError(
                f"A {self.kind!r} teacher cache holds {wanted} outputs only; the terms {other or ['feature_pairs']} "
                "need teacher outputs that are not cached (hidden states, attention maps, other kinds). Use the live "
                "teacher for them, or keep only the "
                + ("embedding terms." if self.kind == "embedding" else "logit terms.")
            )
        if task == "seq2seq":
            raise ValueError("Teacher caches key examples by input_ids; seq2seq students are not supported")
        if self.kind == "embedding":
            if config.pooling != self.pooling:
                raise ValueError(
                    f"The teacher cache holds {self.pooling!r}-pooled embeddings but DistillationConfig.pooling is "
                    f"{config.pooling!r}; rebuild it with pooling={config.pooling!r}."
                )
            return
        self._check_logit_terms(config, student_vocab)

    def _check_logit_terms(self, config: DistillationConfig, student_vocab: int | None) -> None:
        sampled = self.metadata.get("selection") == "sampled"
        for name in config.kinds:
            if self.kind == "lowrank" and get_loss_spec(name).name in ("ofa", "logit_mse"):
                raise ValueError(
                    f"The {name!r} loss compares raw teacher logits; a lowrank teacher cache rebuilds log-probs "
                    "(the logits up to a per-row constant). Use a softmax-based loss (kl, jsd, ...) or the live "
                    "teacher."
                )
            if self.kind == "topk" and get_loss_spec(name).name in ("dkd", "ofa", "logit_mse"):
                raise ValueError(f"The {name!r} loss needs dense teacher logits; a top-k teacher cache has none")
            if sampled:
                self._check_sampled_term(name, config.loss_kwargs.get(name, {}))
            temp = config.loss_kwargs.get(name, {}).get("temperature", config.temperature)
            if not math.isclose(temp, self.temperature):
                raise ValueError(
                    f"The teacher cache holds log-probs at temperature {self.temperature} but the {name!r} term uses "
                    f"{temp}; "
                    + (
                        f"rebuild it with build_teacher_cache(..., temperature={temp})."
                        if self.store is None
                        else f"rebuild it with `kd-plugins cache-teacher ... --temperature {temp}`."
                    )
                )
        tv = self.vocab_size
        if student_vocab is None or student_vocab == tv:
            return
        if tv < student_vocab and config.vocab_alignment == "pad":
            return  # like padding the teacher's logits with -inf: no mass on the student's extra tokens
        raise ValueError(
            f"The teacher cache covers a vocabulary of {tv} tokens but the student has {student_vocab}. A cache "
            "from a smaller, padded-differently vocabulary works with DistillationConfig(vocab_alignment='pad'); "
            "otherwise rebuild it with a teacher of the student's vocabulary."
        )

    @staticmethod
    def _check_sampled_term(name: str, kwargs: Mapping[str, Any]) -> None:
        # Sampled weights estimate p without bias; only a loss linear in p keeps that for its gradient.
        if get_loss_spec(name).name not in ("kl", "soft_ce"):
            raise ValueError(
                f"This teacher cache holds sampled teacher weights (selection='sampled'): they give an unbiased "
                f"gradient for forward KL and soft cross-entropy only, not for {name!r} (its gradient is not linear "
                "in the teacher's probabilities). Use loss_terms='kl', or a top-k cache (selection='topk')."
            )
        if kwargs.get("topk_tail", "bucket") == "renormalize":
            raise ValueError(
                "topk_tail='renormalize' ignores the student's mass outside the cached tokens, which a sampled cache "
                "relies on to push the unsampled tail down; use topk_tail='bucket' (default) with it."
            )

    # -------------------------------------------------------------------------------------------- lookup
    def rows_of(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> list[int]:
        """The cache entry of each example of a ``[B, T]`` batch; raises when some are missing."""
        keys = example_keys(input_ids, attention_mask)
        found = [self._index.get(k) for k in keys]
        missing = sum(i is None for i in found)
        if missing:
            raise KeyError(
                f"{missing} of the {len(keys)} examples in this batch are not in the teacher cache "
                f"({len(self)} examples). {self._rebuild_hint} over the same dataset with the same "
                "tokenizer, truncation and max_length the Trainer uses (include the eval set too, e.g. "
                "ConcatDataset([train, eval]), when the Trainer evaluates; random-masking collators change "
                "input_ids every epoch and cannot be cached)."
            )
        return found

    def lookup(self, batch: Mapping[str, Any], device: torch.device | str | None = None) -> dict[str, Any]:
        """The cached teacher outputs of a collated batch, in the form the engine's terms take:
        ``{"pooled_embedding": [B, D]}``, ``{"teacher_topk": (indices [B, T, k] or [B, k], log_probs)}``, or for a
        ``lowrank`` cache ``{"logits": [B, T, V], "cache_rows": True}``: the rebuilt log-probs times the cache
        temperature, so that the loss's ``softmax(logits / T)`` is the rebuilt row (padded positions hold a uniform
        row; the engine masks them as it masks a top-k cache's)."""
        ids, mask = batch["input_ids"], batch.get("attention_mask")
        rows = self.rows_of(ids, mask)
        device = device if device is not None else ids.device
        if self.kind == "embedding":
            return {"pooled_embedding": self.tensors["embeddings"][rows].to(device)}
        if self.kind == "lowrank":  # logits at temperature 1 whose softmax at the cache temperature is the row
            logits = self._lowrank_for(rows, ids, mask, device)
            return {"logits": logits if self.temperature == 1.0 else logits.mul_(self.temperature), "cache_rows": True}
        return {"teacher_topk": self._topk_for(rows, ids, mask, device)}

    def _rows_topk(self, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The concatenated ``(indices, log_probs)`` rows of the given cache entries (from memory or the shards)."""
        if self.store is not None:
            return self.store.read(rows)
        off, idx, lp = self.tensors["offsets"], self.tensors["indices"], self.tensors["log_probs"]
        sel = torch.cat([torch.arange(int(off[j]), int(off[j + 1])) for j in rows])
        return idx[sel].long(), lp[sel]

    def lowrank_rows(self, batch: Mapping[str, Any], device: torch.device | str | None = None) -> dict[str, Any]:
        """A ``lowrank`` cache's rows of a collated batch, unrebuilt (what the fused kernel rebuilds chunk by chunk):
        ``code`` ``[B, T, r]`` (float PCA coefficients), ``head`` ``(indices [B, T, h], log_probs [B, T, h])`` at the
        cache temperature, and the tail map at temperature 1 (``weight`` ``[V, r]``, ``bias`` ``[V]``: ``code @
        weight.T + bias`` divided by the temperature gives the tail's logits). Padded positions hold zeros and a
        uniform head; they are never read (masked)."""
        if self.kind != "lowrank":
            raise ValueError(f"lowrank_rows reads a 'lowrank' teacher cache, this one is {self.kind!r}")
        ids, mask = batch["input_ids"], batch.get("attention_mask")
        idx, lp, codes, scales = self._rows_lowrank(self.rows_of(ids, mask))
        valid = _valid_positions(ids, mask, idx.shape[0])
        h, dev = idx.shape[-1], torch.device(device if device is not None else ids.device)
        head_idx = torch.arange(h).expand(*ids.shape, h).clone()
        head_lp = torch.full((*ids.shape, h), -math.log(h + 1))
        code = torch.zeros(*ids.shape, codes.shape[-1])
        head_idx[valid], head_lp[valid], code[valid] = idx, lp.float(), code_rows(codes, scales)
        t = self.temperature
        return {
            "code": code.to(dev),
            "head": (head_idx.to(dev), head_lp.to(dev)),
            "weight": (self.tensors["tail_weight"].float() * t).to(dev),
            "bias": (self.tensors["tail_bias"].float() * t).to(dev),
        }

    def _rows_lowrank(self, rows: list[int]) -> tuple[torch.Tensor, ...]:
        """``(indices, log_probs, coefficients, scales)`` of the given entries (from memory or the shards)."""
        if self.store is not None:
            idx, lp, extras = self.store.read_with_extras(rows)
            return idx, lp, extras["coefficients"], extras["scales"]
        t = self.tensors
        sel = torch.cat([torch.arange(int(t["offsets"][j]), int(t["offsets"][j + 1])) for j in rows])
        return t["indices"][sel].long(), t["log_probs"][sel], t["coefficients"][sel], t["scales"][sel]

    def _lowrank_for(self, rows: list[int], ids: torch.Tensor, mask, device) -> torch.Tensor:
        parts = self._rows_lowrank(rows)
        valid = _valid_positions(ids, mask, parts[0].shape[0])
        dev = torch.device(device)
        t = self.tensors
        log_probs = rebuild_log_probs(*(x.to(dev) for x in parts), t["tail_bias"].to(dev), t["tail_weight"].to(dev))
        if bool(valid.all()):  # no padding: the rows are the batch, no copy
            return log_probs.view(*ids.shape, log_probs.shape[-1])
        out = torch.full((*ids.shape, log_probs.shape[-1]), -math.log(log_probs.shape[-1]), device=dev)
        out[valid.to(dev)] = log_probs
        return out

    def _topk_for(self, rows: list[int], ids: torch.Tensor, mask, device) -> tuple[torch.Tensor, torch.Tensor]:
        idx, lp = self._rows_topk(rows)
        if not self.metadata["per_token"]:
            return idx.to(device), lp.to(device)
        k = idx.shape[-1]
        valid = _valid_positions(ids, mask, idx.shape[0])
        # Padded positions get a valid uniform distribution over k tokens: never used (masked), never NaN.
        out_idx = torch.arange(k).expand(*ids.shape, k).clone()
        out_lp = torch.full((*ids.shape, k), -math.log(k), dtype=lp.dtype)
        out_idx[valid] = idx
        out_lp[valid] = lp
        return out_idx.to(device), out_lp.to(device)


def _valid_positions(ids: torch.Tensor, mask: torch.Tensor | None, n_rows: int) -> torch.Tensor:
    """The ``[B, T]`` (CPU) positions a per-token cache holds a row for; refuses rows that do not fit them."""
    valid = torch.ones_like(ids, dtype=torch.bool, device="cpu") if mask is None else mask.detach().cpu().bool()
    if int(valid.sum()) != n_rows:
        raise ValueError("teacher cache rows do not match the batch's unpadded lengths (hash collision?)")
    return valid


# ------------------------------------------------------------------------------------------------------ build
def _ids_mask(batch: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
    return batch["input_ids"], batch.get("attention_mask")


def _is_dataset(data: Any) -> bool:
    """A dataset of single examples (1-D ``input_ids``), as opposed to a DataLoader or a list of batches."""
    if isinstance(data, Mapping) or not (hasattr(data, "__len__") and hasattr(data, "__getitem__")):
        return False
    return len(data) == 0 or torch.as_tensor(data[0]["input_ids"]).dim() <= 1


def _collate(examples: list[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
    """Right-pad the teacher inputs of unpadded examples (the examples keep their own attention_mask)."""
    seqs = [torch.as_tensor(e["input_ids"]).reshape(-1) for e in examples]
    width = max(s.numel() for s in seqs)
    batch = {"input_ids": torch.zeros(len(seqs), width, dtype=torch.long)}
    batch["attention_mask"] = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, (e, s) in enumerate(zip(examples, seqs)):
        batch["input_ids"][i, : s.numel()] = s
        am = e.get("attention_mask")
        batch["attention_mask"][i, : s.numel()] = torch.as_tensor(am).reshape(-1) if am is not None else 1
    if all("token_type_ids" in e for e in examples):
        batch["token_type_ids"] = torch.zeros(len(seqs), width, dtype=torch.long)
        for i, e in enumerate(examples):
            tt = torch.as_tensor(e["token_type_ids"]).reshape(-1)
            batch["token_type_ids"][i, : tt.numel()] = tt
    return batch


def _examples(data: Any) -> list[Mapping[str, Any]]:
    """The dataset's examples, pair examples split into anchor and positive, sorted by length (batches pad
    little; the cache is keyed by content, so order does not matter)."""
    out = []
    for i in range(len(data)):
        anchor, positive = split_pairs(data[i])
        out += [anchor] if positive is None else [anchor, positive]
    return sorted(out, key=lambda e: torch.as_tensor(e["input_ids"]).numel())


def _teacher_batches(data: Any, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
    """Batches of teacher inputs from a dataset of examples (collated here) or an iterable of collated batches;
    the positives of pair examples / pair batches (``positive_*`` keys) are teacher inputs too."""
    if _is_dataset(data):
        examples = _examples(data)
        for start in range(0, len(examples), batch_size):
            yield _collate(examples[start : start + batch_size])
        return
    for batch in data:
        for group in split_pairs(batch):
            if group is None:
                continue
            if torch.as_tensor(group["input_ids"]).dim() != 2:
                raise ValueError("build_teacher_cache: batches must hold [B, T] input_ids (or pass a dataset)")
            yield {k: torch.as_tensor(v) for k, v in group.items() if k in _TEACHER_INPUTS}


def _progress(it, total: int | None, enabled: bool):
    if not enabled:
        return it
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return it
    return tqdm(it, total=total, desc="teacher cache", unit="batch")


class _Builder:
    """Accumulates one payload batch by batch (first occurrence of a key wins: duplicates have equal outputs)."""

    def __init__(
        self, kind: str, top_k: int | None, temperature: float, pooling: str, selection: str = "topk", seed: int = 0
    ):
        self.kind, self.top_k, self.temperature, self.pooling = kind, top_k, temperature, pooling
        self.selection, self.seed = selection, seed
        self.seen: dict[bytes, int] = {}
        self.parts: dict[str, list[torch.Tensor]] = {"embeddings": [], "indices": [], "log_probs": [], "lengths": []}
        self.vocab_size: int | None = None
        self.per_token: bool | None = None
        self.lowrank: LowRankCoder | None = None  # set by build_teacher_cache for kind="lowrank"
        self.retokenized = False  # set by build_teacher_cache when the teacher has its own tokenizer

    def add(self, batch: dict[str, torch.Tensor], out: Any, teacher_mask: torch.Tensor | None = None) -> None:
        """Keep the outputs ``out`` of the examples of ``batch`` not seen yet (keyed by the student's tokens).
        ``teacher_mask``: the attention mask of the teacher's own inputs when they were re-tokenized (pooling)."""
        ids, mask = _ids_mask(batch)
        mask = torch.ones_like(ids) if mask is None else mask
        new, keys = [], []
        for i, key in enumerate(example_keys(ids, mask)):
            if key not in self.seen:
                self.seen[key] = len(self.seen)
                new.append(i)
                keys.append(key)
        if not new:
            return
        if self.kind == "embedding":
            self._add_embeddings(out, mask if teacher_mask is None else teacher_mask, new)
        elif self.kind == "lowrank":
            self._add_lowrank(out, mask, new, keys)
        else:
            self._add_topk(out, mask, new, keys)

    def _add_embeddings(self, out: Any, mask: torch.Tensor, new: list[int]) -> None:
        hidden = out["last_hidden_state"] if isinstance(out, Mapping) else getattr(out, "last_hidden_state", None)
        if hidden is None:
            raise ValueError("kind='embedding' needs a bare encoder teacher returning last_hidden_state (AutoModel)")
        pooled = hidden[:, 0] if self.pooling == "cls" else mean_pool(hidden, mask.to(hidden.device))
        self.parts["embeddings"].append(pooled[new].float().cpu())

    def _add_topk(self, out: Any, mask: torch.Tensor, new: list[int], keys: list[bytes]) -> None:
        logits = out["logits"] if isinstance(out, Mapping) else getattr(out, "logits", None)
        if logits is None:
            raise ValueError("kind='topk' needs a teacher that returns logits")
        self.vocab_size = int(logits.shape[-1])
        self.per_token = logits.dim() == 3
        if self.per_token and self.retokenized:
            raise ValueError(
                "build_teacher_cache(teacher_tokenizer=...): this teacher gives per-token logits, which another "
                "tokenizer's tokens do not line up with. Re-tokenized caches hold sequence-level outputs (pooled "
                "embeddings, sequence-classification logits); distil a causal LM with another tokenizer live with "
                "loss_terms='alm' or 'uld' and teacher_tokenizer=... ."
            )
        k = min(self.top_k or self.vocab_size, self.vocab_size)
        for i, key in zip(new, keys):
            rows = logits[i][mask[i].to(logits.device).bool()] if self.per_token else logits[i : i + 1]
            idx, lp = cache_rows(rows, k, self.temperature, self.selection, self.seed, key)
            self.parts["indices"].append(idx.to(torch.int32).cpu())
            self.parts["log_probs"].append(lp.cpu())
            self.parts["lengths"].append(torch.tensor([rows.shape[0]]))

    def _add_lowrank(self, out: Any, mask: torch.Tensor, new: list[int], keys: list[bytes]) -> None:
        logits = out["logits"] if isinstance(out, Mapping) else getattr(out, "logits", None)
        states = out["hidden_states"] if isinstance(out, Mapping) else getattr(out, "hidden_states", None)
        if logits is None or logits.dim() != 3 or not states:
            raise ValueError(
                "kind='lowrank' needs a causal LM returning per-token logits [B, T, V] and hidden_states "
                "(output_hidden_states=True); use kind='topk' for other models"
            )
        self.vocab_size, self.per_token = int(logits.shape[-1]), True
        if self.top_k >= self.vocab_size:
            raise ValueError(f"kind='lowrank': top_k ({self.top_k}) must be below the vocabulary ({self.vocab_size})")
        for i, key in zip(new, keys):
            valid = mask[i].to(logits.device).bool()
            rows_logits, rows_hidden = logits[i][valid].float(), states[-1][i][valid].float()
            self.lowrank.check_head(rows_hidden, rows_logits)
            idx, lp = cache_rows(rows_logits, self.top_k, self.temperature, "topk", self.seed, key)
            self.parts["indices"].append(idx.to(torch.int32).cpu())
            self.parts["log_probs"].append(lp.to(torch.bfloat16).cpu())
            self.parts["lengths"].append(torch.tensor([rows_logits.shape[0]]))
            self.lowrank.add(rows_hidden.cpu())

    def tensors(self) -> dict[str, torch.Tensor]:
        keys = torch.tensor([list(k) for k in self.seen], dtype=torch.uint8).reshape(-1, _KEY_BYTES)
        if self.kind == "embedding":
            return {"keys": keys, "embeddings": torch.cat(self.parts["embeddings"])}
        lengths = torch.cat(self.parts["lengths"])
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
        rows = {
            "keys": keys,
            "indices": torch.cat(self.parts["indices"]),
            "log_probs": torch.cat(self.parts["log_probs"]),
            "offsets": offsets,
        }
        if self.kind != "lowrank":
            return rows
        codes, scales = self.lowrank.all_codes()
        return {**rows, "coefficients": codes, "scales": scales, **self.lowrank.once()}


def build_teacher_cache(
    teacher: nn.Module,
    dataset_or_batches: Any,
    *,
    kind: str = "embedding",
    top_k: int | None = 32,
    temperature: float = 1.0,
    pooling: str = "mean",
    batch_size: int = 32,
    selection: str = "topk",
    seed: int = 0,
    rank: int = 64,
    fit_tokens: int = 16384,
    teacher_tokenizer: Any = None,
    student_tokenizer: Any = None,
    teacher_max_length: int | None = None,
    progress: bool = True,
) -> TeacherCache:
    """Run ``teacher`` once over a training set and keep what the distillation terms need.

    Args:
        teacher: the frozen teacher (frozen here if it is not), on the device it should run on.
        dataset_or_batches: a dataset of unpadded examples (dicts with ``input_ids`` and optionally
            ``attention_mask`` / ``token_type_ids``; collated here with right padding) or an iterable of collated
            batches (e.g. the Trainer's DataLoader). Examples are keyed by their unpadded ``input_ids``.
        kind: ``"embedding"`` (pooled sentence embeddings of a bare encoder), ``"topk"`` (per-token top-k
            log-probs and indices of a model with logits; sequence-level logits give one row per example) or
            ``"lowrank"`` (causal LMs: per token the exact top-``top_k`` log-probs plus the final hidden state's
            ``rank``-dimensional PCA code, from which every step rebuilds a full distribution for any softmax-based
            loss; distill/cache_lowrank.py. ``top_k=16, rank=64``: 164 bytes per token, plus a ``[V, rank]`` fp16
            map stored once).
        top_k: tokens kept per row for ``kind="topk"`` (``None``: the whole vocabulary, equal to the dense loss);
            the exact head of a ``kind="lowrank"`` row.
        temperature: the loss temperature the log-probs are taken at (must equal ``DistillationConfig.temperature``).
        pooling: ``"mean"`` (attention-mask mean) or ``"cls"``; must equal ``DistillationConfig.pooling``.
        batch_size: examples per teacher forward when a dataset is given.
        selection / seed: ``kind="topk"`` rows: ``"topk"`` (the ``top_k`` most likely tokens) or ``"sampled"`` (an
            exact head plus a seeded sample of the tail with unbiased weights; forward KL / soft CE only), as in
            :func:`kd_plugins.cache_teacher` (distill/cache_select.py).
        rank / fit_tokens: ``kind="lowrank"``: the PCA rank, and how many of the first tokens its basis is fitted on.
        teacher_tokenizer / student_tokenizer: a teacher with another tokenizer (e.g. a larger sentence encoder of
            another family): each example is decoded with ``student_tokenizer`` and re-tokenized with
            ``teacher_tokenizer`` for the teacher (distill/retokenize.py, the live callback's path), and keyed, as
            always, by the student's tokens. Sequence-level outputs only (``kind="embedding"``, or ``"topk"`` on
            sequence-classification logits); the teacher's width may differ from the student's (a learned
            projector, or a width-free term such as ``pair_kl`` / ``affinity_kl``).
        teacher_max_length: truncation of the re-tokenized teacher inputs (default: the teacher tokenizer's
            ``model_max_length``, 512 when it has none). A shorter one caches a long-document teacher faster.
        progress: show a tqdm progress bar (when tqdm is installed).
    """
    if kind not in KINDS:
        raise ValueError(f"build_teacher_cache: kind must be one of {KINDS}, got {kind!r}")
    if kind == "topk" and top_k is not None and top_k < 1:
        raise ValueError(f"build_teacher_cache: top_k must be >= 1 or None, got {top_k}")
    if selection not in SELECTIONS:
        raise ValueError(f"build_teacher_cache: selection must be one of {SELECTIONS}, got {selection!r}")
    if temperature <= 0 or pooling not in ("mean", "cls"):
        raise ValueError(
            f"build_teacher_cache: need temperature > 0 and pooling 'mean'/'cls' ({temperature}, {pooling})"
        )
    if kind == "lowrank" and (top_k is None or top_k < 1 or rank < 1 or fit_tokens < rank):
        raise ValueError(
            f"build_teacher_cache(kind='lowrank') needs top_k >= 1, rank >= 1 and fit_tokens >= rank; got top_k="
            f"{top_k}, rank={rank}, fit_tokens={fit_tokens}"
        )
    retokenized = teacher_tokenizer is not None
    if retokenized and student_tokenizer is None:
        raise ValueError(
            "build_teacher_cache(teacher_tokenizer=...) needs student_tokenizer=... too: the student's examples are "
            "decoded with it and re-tokenized for the teacher."
        )
    if retokenized and kind == "lowrank":
        raise ValueError(
            "build_teacher_cache(kind='lowrank', teacher_tokenizer=...): per-token rows need one tokenizer. "
            "Re-tokenized caches hold sequence-level outputs (kind='embedding', or 'topk' on classification logits)."
        )
    if teacher_max_length is not None and not retokenized:
        raise ValueError("build_teacher_cache: teacher_max_length applies to re-tokenized inputs (teacher_tokenizer=)")
    runner = Teacher(teacher)
    builder = _Builder(kind, top_k, temperature, pooling, selection, seed)
    builder.retokenized = retokenized
    extra = {}
    if kind == "lowrank":
        builder.lowrank = LowRankCoder(runner.module, rank, fit_tokens, temperature)
        extra = {"output_hidden_states": True}
    total = None  # pair examples count twice: the bar counts batches as they come
    for batch in _progress(_teacher_batches(dataset_or_batches, batch_size), total, progress):
        if not retokenized:
            builder.add(batch, runner.forward_batch(batch, **extra))
            continue
        ids, mask = _ids_mask(batch)
        tin = retokenize(student_tokenizer, teacher_tokenizer, ids, mask, max_length=teacher_max_length)
        builder.add(batch, runner.forward_batch(tin), teacher_mask=tin["attention_mask"])
    if not builder.seen:
        raise ValueError("build_teacher_cache: the dataset is empty")
    metadata = {
        "kind": kind,
        "top_k": min(top_k or builder.vocab_size, builder.vocab_size) if kind != "embedding" else None,
        "rank": rank if kind == "lowrank" else None,
        "selection": selection if kind == "topk" else None,
        "sample_seed": seed if kind == "topk" and selection == "sampled" else None,
        "temperature": temperature,
        "vocab_size": builder.vocab_size,
        "pooling": pooling if kind == "embedding" else None,
        "per_token": builder.per_token,
        "teacher_fingerprint": teacher_fingerprint(runner.module),
        "teacher_class": type(runner.module).__name__,
        "dataset_fingerprint": _dataset_fingerprint(builder.seen),
        "num_examples": len(builder.seen),
    }
    if retokenized:  # both tokenizers, so that a load can refuse either one changed
        metadata["tokenizer_fingerprint"] = tokenizer_fingerprint(student_tokenizer)
        metadata["teacher_tokenizer_fingerprint"] = tokenizer_fingerprint(teacher_tokenizer)
        metadata["teacher_max_length"] = teacher_max_length_of(teacher_tokenizer, teacher_max_length)
    return TeacherCache(builder.tensors(), metadata)


# ------------------------------------------------------------------------------------------------------ io
def save_teacher_cache(cache: TeacherCache, directory: str | os.PathLike, *, overwrite: bool = False) -> str:
    """Write ``cache`` to ``directory`` (kd_plugins checkpoint format: atomic, sha256 per tensor). Returns the path.

    A streaming (sharded) cache is copied as it is, atomically."""
    if cache.store is not None:
        return cache.store.copy_to(directory, overwrite=overwrite)
    out = write_checkpoint(
        SPEC, directory, cache.tensors, architecture=None, metadata=cache.metadata, overwrite=overwrite
    )
    return str(out)


def load_teacher_cache(
    directory: str | os.PathLike,
    *,
    teacher: nn.Module | None = None,
    dataset: Any = None,
    kind: str | None = None,
    vocab_size: int | None = None,
    tokenizer: Any = None,
    teacher_tokenizer: Any = None,
    temperature: float | None = None,
    max_open_shards: int = 4,
) -> TeacherCache:
    """Read and verify a cache written by :func:`save_teacher_cache`, or open (streaming) a sharded one written by
    :func:`kd_plugins.cache_teacher`; every expectation given is checked.

    ``teacher``: refuse a cache built with another teacher; ``dataset``: refuse one built over other examples;
    ``kind`` / ``vocab_size``: refuse another payload or vocabulary; ``tokenizer`` (sharded and re-tokenized
    caches): refuse one tokenized with another tokenizer; ``teacher_tokenizer`` (re-tokenized caches, built with
    ``build_teacher_cache(teacher_tokenizer=...)``): refuse one whose teacher read its inputs with another tokenizer;
    ``temperature``: refuse another capture temperature."""
    if is_sharded_cache(directory):
        cache = TeacherCache(directory, max_open_shards=max_open_shards)
    else:
        ckpt = read_checkpoint(SPEC, directory)
        cache = TeacherCache(ckpt.tensors, ckpt.metadata)
    if kind is not None and cache.kind != kind:
        raise ValueError(f"{directory} holds a {cache.kind!r} teacher cache, not {kind!r}")
    if vocab_size is not None and cache.vocab_size != vocab_size:
        raise ValueError(
            f"{directory}: the teacher cache was built over a vocabulary of {cache.vocab_size} tokens, not {vocab_size}"
        )
    if teacher is not None:
        cache.check_teacher(teacher)
    if tokenizer is not None:
        cache.check_tokenizer(tokenizer)
    if teacher_tokenizer is not None:
        cache.check_teacher_tokenizer(teacher_tokenizer)
    if temperature is not None:
        cache.check_temperature(temperature)
    if dataset is not None:
        cache.check_dataset(dataset)
    return cache
