"""``cache_teacher``: run a teacher once over a tokenized dataset and write a sharded top-k logit cache to disk.

The command line ``kd-plugins cache-teacher TEACHER_DIR DATA OUT_DIR --top-k K`` calls it. The cache (format in
``distill/cache_store.py``, encodings in ``distill/cache_codec.py``) is then read lazily during training by
``TeacherCache(OUT_DIR)`` / ``load_teacher_cache(OUT_DIR)``, passed where the teacher goes
(``DistillationCallback(TeacherCache(OUT_DIR), loss_terms="kl", temperature=T)``); see docs/teacher_cache.md.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .._checkpoint import atomic_dir, check_output_dir
from .cache import (
    TeacherCache,
    _dataset_fingerprint,
    _progress,
    _teacher_batches,
    example_keys,
    teacher_fingerprint,
    tokenizer_fingerprint,
)
from .cache_codec import VALUE_FORMATS, check_value_format
from .cache_lowrank import LowRankCoder
from .cache_select import SELECTIONS, cache_rows
from .cache_store import ShardWriter
from .teacher import Teacher

__all__ = ["cache_teacher", "read_cache_data"]


# ------------------------------------------------------------------------------------------------------ data
def _records(data: Any, text_column: str) -> Sequence[Any]:
    """The raw records of ``data``: a ``load_from_disk`` directory, a ``.jsonl`` / ``.txt`` file, or a sequence."""
    if not isinstance(data, (str, os.PathLike)):
        return data
    path = Path(data)
    if path.is_dir():
        from datasets import DatasetDict, load_from_disk

        ds = load_from_disk(str(path))
        if isinstance(ds, DatasetDict):
            raise ValueError(
                f"{path} holds a DatasetDict with splits {list(ds)}; cache one split: save it with "
                "ds['train'].save_to_disk(DIR) and pass DIR."
            )
        return ds
    if path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as fh:
            return [json.loads(line) for line in fh if line.strip()]
    if path.suffix == ".txt":
        import re

        return [t for t in re.split(r"\n\s*\n", path.read_text(encoding="utf-8")) if t.strip()]
    raise ValueError(
        f"DATA {path} is neither a datasets.load_from_disk directory nor a .jsonl / .txt file; pass one of them "
        f"(a .jsonl line is a JSON object with {text_column!r} or 'input_ids'; a .txt file holds one example per "
        "paragraph, paragraphs separated by blank lines)."
    )


def _example(record: Any, tokenizer: Any, text_column: str, max_length: int | None) -> dict[str, torch.Tensor]:
    if isinstance(record, dict) and "input_ids" in record:
        ids = torch.as_tensor(record["input_ids"], dtype=torch.long).reshape(-1)
        am = record.get("attention_mask")
        am = torch.ones_like(ids) if am is None else torch.as_tensor(am, dtype=torch.long).reshape(-1)
        return {"input_ids": ids[am.bool()], "attention_mask": torch.ones(int(am.sum()), dtype=torch.long)}
    text = record if isinstance(record, str) else (record.get(text_column) if isinstance(record, dict) else None)
    if not isinstance(text, str):
        cols = list(record) if isinstance(record, dict) else type(record).__name__
        raise ValueError(
            f"an example has neither 'input_ids' nor a text column {text_column!r} (it has {cols}); pass "
            "--text-column / text_column= naming the column that holds the text."
        )
    if tokenizer is None:
        raise ValueError("the data holds text: pass the teacher's tokenizer (tokenizer=...) to tokenize it")
    ids = tokenizer(text, truncation=max_length is not None, max_length=max_length)["input_ids"]
    ids = torch.as_tensor(ids, dtype=torch.long)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def read_cache_data(
    data: Any, tokenizer: Any = None, *, text_column: str = "text", max_length: int | None = None
) -> list[dict[str, torch.Tensor]]:
    """The examples :func:`cache_teacher` caches, tokenized exactly as it tokenizes them: tokenize the training set
    with this function (same arguments) so the Trainer's batches find their cache rows.

    ``data``: a ``datasets.load_from_disk`` directory (one split), a ``.jsonl`` file (one JSON object per line, with
    ``text_column`` or ``input_ids``), a ``.txt`` file (one example per paragraph; paragraphs are separated by blank
    lines), or a sequence of such records / strings. Text is tokenized with ``tokenizer`` (its special tokens
    included, truncated to ``max_length`` when given); records with ``input_ids`` are used as they are (padding
    dropped by their ``attention_mask``). Examples without tokens are skipped.
    """
    examples = (_example(r, tokenizer, text_column, max_length) for r in _records(data, text_column))
    return [e for e in examples if e["input_ids"].numel()]


# ------------------------------------------------------------------------------------------------------ writing
def _load_teacher(teacher: Any, tokenizer: Any) -> tuple[nn.Module, Any]:
    if not isinstance(teacher, (str, os.PathLike)):
        return teacher, tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(teacher))
    return model, tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(str(teacher))


def _check_args(
    top_k: int, temperature: float, batch_size: int, value_format: str, selection: str, kind: str = "topk"
) -> None:
    if kind not in ("topk", "lowrank"):
        raise ValueError(f"cache_teacher: kind must be 'topk' or 'lowrank', got {kind!r}")
    if kind == "lowrank" and selection != "topk":
        raise ValueError("cache_teacher: kind='lowrank' keeps an exact top-k head; use selection='topk' with it")
    if top_k < 1:
        raise ValueError(f"cache_teacher: top_k must be >= 1, got {top_k}")
    if temperature <= 0:
        raise ValueError(f"cache_teacher: temperature must be > 0, got {temperature}")
    if batch_size < 1:
        raise ValueError(f"cache_teacher: batch_size must be >= 1, got {batch_size}")
    if value_format not in VALUE_FORMATS:
        raise ValueError(f"cache_teacher: value_format must be one of {VALUE_FORMATS}, got {value_format!r}")
    if selection not in SELECTIONS:
        raise ValueError(f"cache_teacher: selection must be one of {SELECTIONS}, got {selection!r}")
    if selection == "sampled" and value_format == "head_tail":
        raise ValueError(
            "cache_teacher: selection='sampled' stores sampled weights, not a decreasing top-k a tail curve can "
            "fit; use value_format='bf16' or 'fp32'."
        )


class _Rows:
    """Top-k rows of each new example, handed to the shard writer (created once the vocabulary is known)."""

    def __init__(
        self,
        directory: Path,
        top_k: int,
        temperature: float,
        writer_kwargs: dict[str, Any],
        selection: str = "topk",
        seed: int = 0,
        coder: LowRankCoder | None = None,
    ):
        self.directory, self.top_k, self.temperature = directory, top_k, temperature
        self.selection, self.seed = selection, seed
        self.writer_kwargs = writer_kwargs
        self.writer: ShardWriter | None = None
        self.keys: dict[bytes, int] = {}
        self.lengths: list[int] = []
        self.per_token: bool | None = None
        self.coder = coder  # kind="lowrank": rows wait (in order) until their hidden-state codes exist
        self.waiting: list[tuple[torch.Tensor, torch.Tensor]] = []

    def add(self, batch: dict[str, torch.Tensor], out: Any) -> None:
        logits = out["logits"] if isinstance(out, dict) else getattr(out, "logits", None)
        if logits is None:
            raise ValueError("cache_teacher needs a teacher that returns logits (e.g. AutoModelForCausalLM)")
        if self.writer is None:
            vocab, k = int(logits.shape[-1]), min(self.top_k, int(logits.shape[-1]))
            self.per_token = logits.dim() == 3
            if self.coder is not None and (not self.per_token or k >= vocab):
                raise ValueError(
                    "cache_teacher(kind='lowrank') needs per-token logits [B, T, V] and top_k below the vocabulary "
                    f"({vocab}); got logits {tuple(logits.shape)}, top_k {self.top_k}"
                )
            self.writer = ShardWriter(self.directory, vocab_size=vocab, top_k=k, **self.writer_kwargs)
        mask = batch["attention_mask"].to(logits.device).bool()
        for i, key in enumerate(example_keys(batch["input_ids"], batch["attention_mask"])):
            if key in self.keys:
                continue  # a duplicate example: same rows
            self.keys[key] = len(self.keys)
            rows = logits[i][mask[i]] if self.per_token else logits[i : i + 1]
            idx, lp = cache_rows(rows, self.writer.encoding["top_k"], self.temperature, self.selection, self.seed, key)
            self.lengths.append(rows.shape[0])
            if self.coder is None:
                self.writer.add(idx, lp)
                continue
            hidden = _last_hidden(out)[i][mask[i]].float()
            self.coder.check_head(hidden, rows.float())
            self.coder.add(hidden.cpu())
            self.waiting.append((idx, lp))
            self._write_coded()

    def _write_coded(self) -> None:
        for codes, scales in self.coder.ready():
            idx, lp = self.waiting.pop(0)
            self.writer.add(idx, lp, {"coefficients": codes, "scales": scales})

    def finish(self, metadata: dict[str, Any]) -> dict[str, Any]:
        once = None
        if self.coder is not None:
            self.coder.finish()
            self._write_coded()
            once = self.coder.once()
        keys = torch.tensor([list(k) for k in self.keys], dtype=torch.uint8).reshape(-1, 16)
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), torch.tensor(self.lengths).cumsum(0)])
        enc = self.writer.encoding
        metadata = {
            **metadata,
            "top_k": enc["top_k"],
            "vocab_size": enc["vocab_size"],
            "per_token": self.per_token,
            "dataset_fingerprint": _dataset_fingerprint(self.keys),
            "num_examples": len(self.keys),
            "num_tokens": int(offsets[-1]),
        }
        return self.writer.finish(keys, offsets, metadata, once)


def _last_hidden(out: Any) -> torch.Tensor:
    states = out["hidden_states"] if isinstance(out, dict) else getattr(out, "hidden_states", None)
    if not states:
        raise ValueError("cache_teacher(kind='lowrank') needs a teacher that returns hidden_states")
    return states[-1]


def cache_teacher(
    teacher: nn.Module | str | os.PathLike,
    data: Any,
    out_dir: str | os.PathLike,
    *,
    top_k: int = 32,
    temperature: float = 1.0,
    tokenizer: Any = None,
    batch_size: int = 8,
    max_length: int | None = None,
    text_column: str = "text",
    shard_tokens: int = 1 << 20,
    value_format: str = "bf16",
    head_k: int = 8,
    tail_degree: int = 2,
    selection: str = "topk",
    seed: int = 0,
    kind: str = "topk",
    rank: int = 64,
    fit_tokens: int = 16384,
    overwrite: bool = False,
    progress: bool = True,
) -> TeacherCache:
    """Run ``teacher`` once over ``data`` and write its per-token top-k log-probs to ``out_dir`` in shards.

    Args:
        teacher: a model returning logits (on the device it should run on), or a Hugging Face directory (loaded
            with ``AutoModelForCausalLM`` and, unless ``tokenizer`` is given, ``AutoTokenizer``).
        data: what :func:`read_cache_data` reads (a ``load_from_disk`` directory, ``.jsonl``, ``.txt``, or a
            sequence of examples / texts); text is tokenized with ``tokenizer``.
        out_dir: the cache directory, published atomically (nothing is left there if anything fails).
        top_k: tokens kept per position (capped at the vocabulary size; ``top_k`` = vocabulary gives the dense loss).
        temperature: the loss temperature the log-probs are taken at (must equal ``DistillationConfig.temperature``).
        tokenizer: the teacher's tokenizer; its fingerprint is recorded (``TeacherCache.check_tokenizer``).
        batch_size / max_length / text_column: teacher batch size, truncation of text, text column of records.
        shard_tokens: rows (tokens) per shard file; examples are never split across shards.
        value_format: ``"bf16"`` (default), ``"head_tail"`` (exact bf16 head of ``head_k`` values + a degree
            ``tail_degree`` fit of the rest, mass-preserving) or ``"fp32"`` (exact); see distill/cache_codec.py.
        selection: ``"topk"`` (default: the ``top_k`` most likely tokens) or ``"sampled"`` (the likeliest tokens
            exactly and the other slots drawn in proportion to the teacher's probabilities, with weights that are
            unbiased for them: the forward KL's gradient is then unbiased for the full-vocabulary one; only forward
            KL / soft cross-entropy terms may read it). See distill/cache_select.py.
        seed: seed of the draws of ``selection="sampled"`` (the cache is reproducible).
        kind: ``"topk"`` (default) or ``"lowrank"``: per token the exact top-``top_k`` plus a ``rank``-dimensional
            PCA code of the teacher's final hidden state (fitted on the first ``fit_tokens`` tokens), from which the
            callback rebuilds a full distribution every step (distill/cache_lowrank.py, docs/teacher_cache.md).
        overwrite: replace an existing non-empty ``out_dir``.
        progress: a tqdm progress bar (when tqdm is installed).

    Returns:
        The cache, opened from ``out_dir`` for streaming (:class:`TeacherCache`).
    """
    _check_args(top_k, temperature, batch_size, value_format, selection, kind)
    if value_format == "head_tail":
        check_value_format(value_format, top_k, head_k, tail_degree)  # fail before the teacher runs
    out = check_output_dir(out_dir, overwrite)
    model, tokenizer = _load_teacher(teacher, tokenizer)
    examples = read_cache_data(data, tokenizer, text_column=text_column, max_length=max_length)
    if not examples:
        raise ValueError(f"cache_teacher: {data!r} holds no examples with tokens")
    runner = Teacher(model)
    writer_kwargs = dict(value_format=value_format, head_k=head_k, tail_degree=tail_degree, shard_tokens=shard_tokens)
    coder = LowRankCoder(runner.module, rank, fit_tokens, temperature) if kind == "lowrank" else None
    if coder is not None and fit_tokens < rank:
        raise ValueError(f"cache_teacher: fit_tokens ({fit_tokens}) must be >= rank ({rank})")
    metadata = {
        "kind": kind,
        "rank": rank if kind == "lowrank" else None,
        "selection": selection,
        "sample_seed": seed if selection == "sampled" else None,
        "temperature": float(temperature),
        "pooling": None,
        "teacher_fingerprint": teacher_fingerprint(runner.module),
        "teacher_class": type(runner.module).__name__,
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer) if tokenizer is not None else None,
        "max_length": max_length,
        "text_column": text_column,
        "source": str(data) if isinstance(data, (str, os.PathLike)) else type(data).__name__,
    }
    with atomic_dir(out) as tmp:
        rows = _Rows(tmp, top_k, temperature, writer_kwargs, selection, seed, coder)
        extra = {"output_hidden_states": True} if coder is not None else {}
        batches = _teacher_batches(examples, batch_size)
        for batch in _progress(batches, (len(examples) + batch_size - 1) // batch_size, progress):
            rows.add(batch, runner.forward_batch(batch, **extra))
        rows.finish(metadata)
    return TeacherCache(out)


# ------------------------------------------------------------------------------------------------------ CLI
def cache_teacher_main(argv: list[str]) -> int:
    """Run the teacher in TEACHER_DIR once over DATA and write a sharded top-k logit cache to OUT_DIR
    (docs/teacher_cache.md). Train with DistillationCallback(TeacherCache(OUT_DIR), temperature=T, ...)."""
    p = argparse.ArgumentParser(prog="kd-plugins cache-teacher", description=cache_teacher_main.__doc__)
    p.add_argument("teacher_dir", help="Hugging Face model directory (with its tokenizer)")
    p.add_argument("data", help="datasets.load_from_disk directory, .jsonl (text / input_ids) or .txt (paragraphs)")
    p.add_argument("out_dir", help="cache directory to write (atomically)")
    p.add_argument("--top-k", type=int, required=True, help="tokens kept per position")
    p.add_argument("--temperature", type=float, default=1.0, help="loss temperature of the log-probs (default 1)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=None, help="truncate text to this many tokens")
    p.add_argument("--text-column", default="text", help="column / JSON key holding the text (default: text)")
    p.add_argument("--shard-tokens", type=int, default=1 << 20, help="rows (tokens) per shard (default 1048576)")
    p.add_argument("--value-format", default="bf16", choices=VALUE_FORMATS, help="log-prob encoding (default bf16)")
    p.add_argument(
        "--selection",
        default="topk",
        choices=SELECTIONS,
        help="topk: the K most likely tokens (default); sampled: a sample with unbiased weights (forward KL only)",
    )
    p.add_argument("--seed", type=int, default=0, help="sampled: seed of the draws (default 0)")
    p.add_argument(
        "--kind",
        default="topk",
        choices=("topk", "lowrank"),
        help="lowrank: also store a PCA code of the teacher's final hidden state; the callback rebuilds full rows",
    )
    p.add_argument("--rank", type=int, default=64, help="lowrank: PCA rank (default 64)")
    p.add_argument("--fit-tokens", type=int, default=16384, help="lowrank: tokens the basis is fitted on")
    p.add_argument("--head-k", type=int, default=8, help="head_tail: values kept exactly (default 8)")
    p.add_argument("--tail-degree", type=int, default=2, help="head_tail: polynomial degree of the tail (default 2)")
    p.add_argument("--auto-class", default="AutoModelForCausalLM", help="transformers Auto class of the teacher")
    p.add_argument("--device", default="cpu", help="device the teacher runs on (default cpu)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="teacher dtype")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    args = p.parse_args(argv)
    import transformers

    load_kwargs = {"torch_dtype": getattr(torch, args.dtype)} if args.dtype else {}
    model = getattr(transformers, args.auto_class).from_pretrained(args.teacher_dir, **load_kwargs).to(args.device)
    tokenizer = transformers.AutoTokenizer.from_pretrained(args.teacher_dir)
    cache = cache_teacher(
        model,
        args.data,
        args.out_dir,
        top_k=args.top_k,
        temperature=args.temperature,
        tokenizer=tokenizer,
        batch_size=args.batch_size,
        max_length=args.max_length,
        text_column=args.text_column,
        shard_tokens=args.shard_tokens,
        value_format=args.value_format,
        head_k=args.head_k,
        tail_degree=args.tail_degree,
        selection=args.selection,
        seed=args.seed,
        kind=args.kind,
        rank=args.rank,
        fit_tokens=args.fit_tokens,
        overwrite=args.overwrite,
    )
    m = cache.store.manifest
    print(
        f"cached {m['metadata']['num_examples']} examples, {m['num_rows']} tokens, {cache.kind}, top_k={cache.top_k}, "
        f"T={cache.temperature}, {len(m['shards'])} shard(s), {m['bytes_per_token']:.1f} bytes/token "
        f"({m['encoding']['value_format']}) -> {args.out_dir}"
    )
    return 0
