"""Tokenizer transfer benchmark: SmolLM2-135M moved to a new 16k byte-level BPE, trained with CE / ULD / ALM.

The recipe of Minixhofer, Vulić and Ponti ("Cross-Tokenizer Distillation via Approximate Likelihood Matching"):
the student is SmolLM2 with a new tokenizer, its embeddings initialised from the old ones
(``kd_plugins.crosstok.transfer.transfer_tokenizer``); the teacher is the original SmolLM2 with its own tokenizer.
Every arm trains the same number of steps on the same rows in the same order
(``kd_plugins.integrations.hf.tokenizer_transfer.train_transferred``: an unmodified ``transformers.Trainer`` with
``DistillationCallback(original, ..., teacher_tokenizer=old_tokenizer)``).

Setup (fixed before any run):

* New tokenizer: a byte-level BPE (``Ġ`` convention, SmolLM2's special tokens with SmolLM2's roles), trained with
  the ``tokenizers`` library on the training text, ``--vocab-size`` tokens (16,000).
* Training text (``--train-domain``): Jane Austen's novels other than *Persuasion* (Debian ``r-cran-janeaustenr``;
  default) or, the reverse direction, the paragraphs of the BBC News training-split articles; paragraphs cut at
  whitespace into rows of at most ``--seq-len`` new tokens.
* Arms (``--arms``): ``init`` (embedding initialisation only), ``ce`` (cross-entropy on the text), ``ce_uld``
  (CE + ULD), ``ce_alm`` (CE + ALM), ``alm`` (ALM only). Weights 1.0 each; ALM in its default form (binarised CE,
  tau = 100). ``ce_alm_gradmag``: CE + ALM with ``term_balance="gradmag"`` (each term rescaled every step to the
  same gradient norm at the logits: the binarised ALM's gradient is about 1/tau of CE's, so at weight 1 CE + ALM
  trains like CE alone; tokenkit combines ALM with SFT this way). ``ce_alm_gradmag_embeddings``: the same, training
  only the (tied) embeddings, at ``--embeddings-lr`` (1e-3): the transfer replaced the embeddings only, so the body
  keeps the original's weights instead of drifting towards the training domain. ``ce_alm_hidden_gradmag`` /
  ``ce_alm_hidden_all_gradmag``: CE + ALM (``gradmag``) + ``chunk_hidden`` (the last hidden state, or every layer's
  output, matched to the original's at the ends of aligned chunks, channel-normalised; tokenkit's ``alm_latents``;
  ``gradmag`` leaves it at its configured weight, 3 and 8: see ``HIDDEN_ARMS``).
* ``--eval-split validation`` scores validation text instead (BBC News validation-split paragraphs and passages of
  *Emma*; with ``--train-domain austen`` *Emma* then leaves the training novels): recipes are picked there, the test
  sets are run once.
* Metrics, for the teacher and every arm:

  - bits per byte on held-out text of the other domain: paragraphs of the BBC News test split (at most
    ``--eval-chars`` = 600 characters each, cut at whitespace), every text token scored after a
    ``<|endoftext|>`` context token: ``total NLL / ln 2 / UTF-8 bytes`` (comparable across tokenizers); the
    same on *Persuasion* passages (held-out text of the training domain);
  - the mean absolute chunk log-likelihood gap to the teacher on the BBC paragraphs,
    ``mean_k |log P_S(c_k) - log P_T(c_k)|`` in nats over the chunks both tokenizations end on (ALM's ``abs``
    form).

* Cross-model arms (``small_ce``, ``small_ce_alm``; run them with ``--arms small_ce,small_ce_alm``): a student of
  another size and tokenizer (the transferred SmolLM2 cut to ``--small-layers`` = 10 of its 30 layers by
  ``inherit_student``) distilled from the full SmolLM2 with its own tokenizer: CE only vs CE + ALM.

``--smoke`` runs every arm for 2 steps on a tiny slice (a 1,000-token BPE, rows of 32 tokens, 4 evaluation
texts of at most 200 characters) to check the script end to end; its figures mean nothing (about 2 minutes with
one thread on the 2-core development machine).
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import math
import os
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for _harness
from _harness import ROOT, command_line, elapsed_logger, omp_prefix, set_threads_and_seed  # noqa: E402

os.environ.setdefault("WANDB_DISABLED", "true")

# isort: split
import torch  # noqa: E402

from benchmarks.data.bbc import article_paragraphs, split_articles  # noqa: E402
from benchmarks.data.lm import jane_austen_texts, load_smollm2  # noqa: E402
from kd_plugins.crosstok import CrossTokenizerTeacher, cross_tokenizer_loss  # noqa: E402
from kd_plugins.crosstok.transfer import TokenizerTransferConfig, transfer_tokenizer  # noqa: E402
from kd_plugins.distill import inherit_student  # noqa: E402

ARMS = {  # arm -> (alm_weight, uld_weight, ce_weight); None: no training
    "init": None,
    "ce": (0.0, 0.0, 1.0),
    "ce_uld": (0.0, 1.0, 1.0),
    "ce_alm": (1.0, 0.0, 1.0),
    "alm": (1.0, 0.0, 0.0),
    "ce_alm_gradmag": (1.0, 0.0, 1.0),
    "ce_alm_gradmag_embeddings": (1.0, 0.0, 1.0),
    "ce_alm_hidden_gradmag": (1.0, 0.0, 1.0),
    "ce_alm_hidden_all_gradmag": (1.0, 0.0, 1.0),
}
# Arms that also match hidden states at chunk ends (``chunk_hidden``, tokenkit's alm_latents): arm -> (hidden_layers,
# hidden_weight). The transferred model has the original's depth, so every layer can be matched. The weights give
# the term about the gradient norm over the parameters that CE has after ``gradmag`` balancing, measured on two
# training batches at the initialisation (at weight 1: 0.87-1.34 for the last layer, 0.33-0.39 for all layers,
# against CE's 2.4-3.3).
HIDDEN_ARMS = {"ce_alm_hidden_gradmag": ("last", 3.0), "ce_alm_hidden_all_gradmag": ("all", 8.0)}
# Cross-model arms: a student of another size *and* tokenizer (SmolLM2 moved to the new tokenizer, then cut to
# ``--small-layers`` of its 30 layers) distilled from the full SmolLM2 with its own tokenizer.
CROSS_MODEL_ARMS = {
    "small_ce": (0.0, 0.0, 1.0),
    "small_ce_alm": (1.0, 0.0, 1.0),
    "small_ce_alm_gradmag": (1.0, 0.0, 1.0),
}
HELDOUT_NOVEL = "persuasion"
VALIDATION_NOVEL = "emma"
CONTEXT_TOKEN = "<|endoftext|>"
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # SmolLM2's, with its roles (unk, bos, eos = pad)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(
        "--arms",
        default=",".join(ARMS),
        help=f"comma-separated arms out of {list(ARMS) + list(CROSS_MODEL_ARMS)}",
    )
    p.add_argument(
        "--train-domain",
        choices=("austen", "bbc"),
        default="austen",
        help="text the new tokenizer and the students are trained on; the other domain is the held-out one",
    )
    p.add_argument("--small-layers", type=int, default=10, help="layers of the cross-model arms' student (of 30)")
    p.add_argument("--steps", type=int, default=400, help="optimizer steps of every trained arm")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128, help="new-tokenizer tokens per training row")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument(
        "--embeddings-lr", type=float, default=1e-3, help="learning rate of the *_embeddings arms (embeddings only)"
    )
    p.add_argument("--warmup-steps", type=int, default=40)
    p.add_argument("--vocab-size", type=int, default=16000, help="size of the new byte-level BPE")
    p.add_argument("--eval-texts", type=int, default=300, help="BBC test paragraphs (and Persuasion passages) scored")
    p.add_argument("--eval-chars", type=int, default=600, help="evaluation texts are cut at whitespace to this length")
    p.add_argument(
        "--eval-split",
        choices=("test", "validation"),
        default="test",
        help="score the test sets (BBC test split, Persuasion) or validation sets (BBC validation split, Emma)",
    )
    p.add_argument("--eval-batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--out",
        default=None,
        help="JSON results file (default: results/<name>.json beside this script; --smoke: under .cache/)",
    )
    p.add_argument("--smoke", action="store_true", help="2 steps per arm on a tiny slice: checks the script only")
    args = p.parse_args(argv)
    unknown = sorted(set(args.arms.split(",")) - set(ARMS) - set(CROSS_MODEL_ARMS))
    if unknown:
        p.error(f"unknown arms {unknown}; choose from {list(ARMS) + list(CROSS_MODEL_ARMS)}")
    if args.smoke:
        args.steps, args.batch_size, args.seq_len, args.vocab_size = 2, 2, 32, 1000
        args.eval_texts, args.eval_chars, args.warmup_steps = 4, 200, 0
    return args


# ---------------------------------------------------------------------------------------------------------- data
def _paragraphs(text: str) -> list[str]:
    return [re.sub(r"\s+", " ", p).strip() for p in re.split(r"\n\s*\n", text) if len(p.split()) >= 5]


def _capped(text: str, limit: int = 600) -> str:
    """At most ``limit`` characters, cut at whitespace."""
    if len(text) <= limit:
        return text
    cut = text.rfind(" ", 0, limit)
    return text[: cut if cut > 0 else limit]


def load_texts(args) -> dict[str, list[str]]:
    """Training paragraphs of ``args.train_domain`` and the two evaluation sets (the same in both directions):
    BBC News test-split paragraphs and passages of the held-out novel *Persuasion* (``--eval-split validation``:
    validation-split paragraphs and *Emma*)."""
    books = jane_austen_texts(ROOT / ".cache" / "assets")
    split = split_articles()
    validation = args.eval_split == "validation"
    novel = VALIDATION_NOVEL if validation else HELDOUT_NOVEL
    if args.train_domain == "austen":
        held_out = {HELDOUT_NOVEL, novel}
        train = [p for name, book in books.items() if name not in held_out for p in _paragraphs(book)]
    else:  # BBC News training-split articles (the test and validation splits' paragraphs are evaluation text)
        train = [p for a in split.train for p in article_paragraphs(a)]
    held = _paragraphs(books[novel])
    bbc = [p for a in (split.validation if validation else split.test) for p in article_paragraphs(a, min_words=20)]
    n = args.eval_texts
    pick = lambda xs: [_capped(xs[i * len(xs) // n], args.eval_chars) for i in range(n)]  # noqa: E731 - evenly spaced
    if args.smoke:
        train = train[:300]
    return {"train": train, "bbc": pick(bbc), "austen_heldout": pick(held)}


def other_domain(args) -> str:
    """The evaluation set of the domain the new tokenizer and the students were *not* trained on."""
    return "bbc" if args.train_domain == "austen" else "austen_heldout"


def train_bpe(texts: list[str], vocab_size: int):
    """A byte-level BPE (SmolLM2's conventions and special tokens) trained on ``texts``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token=SPECIALS[0], bos_token=SPECIALS[1], eos_token=SPECIALS[2], pad_token=SPECIALS[2]
    )


# ---------------------------------------------------------------------------------------------------- evaluation
def _eval_batches(tok, texts: list[str], batch_size: int):
    """Rows ``[<|endoftext|>] + tokens(text)``, right-padded; labels = ids with -100 at the context and padding."""
    ctx = tok.convert_tokens_to_ids(CONTEXT_TOKEN)
    for i in range(0, len(texts), batch_size):
        rows = [[ctx] + tok(t, add_special_tokens=False)["input_ids"] for t in texts[i : i + batch_size]]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for b, r in enumerate(rows):
            ids[b, : len(r)], mask[b, : len(r)] = torch.tensor(r), 1
        labels = ids.masked_fill(mask == 0, -100)
        labels[:, 0] = -100
        yield texts[i : i + batch_size], {"input_ids": ids, "attention_mask": mask, "labels": labels}


@torch.no_grad()
def bits_per_byte(model, tok, texts: list[str], batch_size: int) -> float:
    model.eval()
    device = next(model.parameters()).device
    nll, n_bytes = 0.0, 0
    for chunk, batch in _eval_batches(tok, texts, batch_size):
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
        target = batch["labels"][:, 1:]
        nll += torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, reduction="sum").item()
        n_bytes += sum(len(t.encode("utf-8")) for t in chunk)
    return nll / math.log(2) / n_bytes


@torch.no_grad()
def chunk_gap(model, tok, source: CrossTokenizerTeacher, texts: list[str], batch_size: int) -> dict:
    """Mean |log P_S(c) - log P_T(c)| (nats) over the scored chunks of ``texts``, and the chunk count."""
    model.eval()
    device = next(model.parameters()).device
    total, chunks = 0.0, 0
    for _, batch in _eval_batches(tok, texts, batch_size):
        batch = {k: v.to(device) for k, v in batch.items()}
        t_out = source(batch)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        total += cross_tokenizer_loss(logits, batch, t_out, "alm", form="abs", reduction="sum").item()
        chunks += int(t_out["chunk_mask"].sum())
    return {"chunk_gap_nats": total / max(chunks, 1), "chunks": chunks}


def evaluate(model, tok, texts, args, source=None) -> dict:
    row = {
        "bpb_bbc": bits_per_byte(model, tok, texts["bbc"], args.eval_batch_size),
        "bpb_austen_heldout": bits_per_byte(model, tok, texts["austen_heldout"], args.eval_batch_size),
    }
    if source is not None:  # on the other domain's text
        row.update(chunk_gap(model, tok, source, texts[other_domain(args)], args.eval_batch_size))
    return row


# ---------------------------------------------------------------------------------------------------------- arms
def run_arm(arm, teacher, old_tok, new_tok, texts, args, log) -> dict:
    from kd_plugins.integrations.hf.tokenizer_transfer import train_transferred

    weights = ARMS[arm] if arm in ARMS else CROSS_MODEL_ARMS[arm]
    cfg = TokenizerTransferConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        max_length=args.seq_len,
        learning_rate=args.embeddings_lr if arm.endswith("_embeddings") else args.lr,
        train_embeddings_only=arm.endswith("_embeddings"),
        warmup_steps=args.warmup_steps,
        logging_steps=max(1, min(10, args.steps)),
        seed=args.seed,
        term_balance="gradmag" if "_gradmag" in arm else "none",
        **(dict(zip(("hidden_layers", "hidden_weight"), HIDDEN_ARMS[arm])) if arm in HIDDEN_ARMS else {}),
        **(dict(zip(("alm_weight", "uld_weight", "ce_weight"), weights)) if weights else {}),
    )
    t0 = time.time()
    student = transfer_tokenizer(teacher, old_tok, new_tok, cfg)
    if arm in CROSS_MODEL_ARMS:  # another model: fewer layers (uniformly spread, last kept) and another tokenizer
        student = inherit_student(student, args.small_layers)
    history = []
    if weights is not None:
        with tempfile.TemporaryDirectory(prefix="crosstok_bench_") as tmp:
            trainer = train_transferred(student, new_tok, teacher, old_tok, texts["train"], cfg, output_dir=tmp)
        history = [h for h in trainer.state.log_history if "loss" in h]
        del trainer
    train_s = time.time() - t0
    source = CrossTokenizerTeacher(teacher, new_tok, old_tok)
    row = {"arm": arm, "train_seconds": round(train_s, 1), **evaluate(student, new_tok, texts, args, source)}
    row["last_log"] = history[-1] if history else None
    log(f"{arm}: {json.dumps({k: v for k, v in row.items() if k != 'last_log'})}")
    del student
    gc.collect()
    return row


def table(rows: list[dict], train_domain: str = "austen", novel: str = "Persuasion") -> str:
    bbc, austen = ("other domain", "held out, training domain")[:: 1 if train_domain == "austen" else -1]
    lines = [
        f"| arm | bits/byte BBC ({bbc}) | bits/byte {novel} ({austen}) | chunk gap to teacher, other domain |",
        "|---|---|---|---|",
    ]
    for r in rows:
        gap = f"{r['chunk_gap_nats']:.3f}" if "chunk_gap_nats" in r else "-"
        lines.append(f"| {r['arm']} | {r['bpb_bbc']:.4f} | {r['bpb_austen_heldout']:.4f} | {gap} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    set_threads_and_seed(args.threads, args.seed)
    log = elapsed_logger()
    teacher, old_tok = load_smollm2()
    teacher.to("cuda" if torch.cuda.is_available() else "cpu")  # the students are copies of it: the same device
    texts = load_texts(args)
    log(f"texts: {len(texts['train'])} training paragraphs, {len(texts['bbc'])} BBC / Austen {args.eval_split} texts")
    new_tok = train_bpe(texts["train"], args.vocab_size)
    tokenizer_sha = hashlib.sha256(new_tok.backend_tokenizer.to_str().encode()).hexdigest()[:16]
    log(f"new tokenizer: {len(new_tok)} tokens (SmolLM2: {len(old_tok)}), sha256 {tokenizer_sha}")
    rows = [{"arm": "teacher (SmolLM2 tokenizer)", **evaluate(teacher, old_tok, texts, args)}]
    log(f"teacher: {json.dumps(rows[0])}")
    name = "tokenizer_transfer_smollm2" + ("_from_bbc" if args.train_domain == "bbc" else "")
    name += "_validation" if args.eval_split == "validation" else ""
    name += "_smoke" if args.smoke else ""
    out = Path(args.out) if args.out else (ROOT / ".cache" / "crosstok" if args.smoke else Path(__file__).parent)
    out = out if out.suffix == ".json" else out / "results" / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "command": omp_prefix() + command_line(__file__),
        "args": vars(args),
        "new_tokenizer_sha256": tokenizer_sha,  # runs split over several processes must share it
        "rows": rows,
    }
    for arm in args.arms.split(","):
        rows.append(run_arm(arm, teacher, old_tok, new_tok, texts, args, log))
        out.write_text(json.dumps(record, indent=2))  # after every arm: a long run keeps what it measured
    novel = VALIDATION_NOVEL if args.eval_split == "validation" else HELDOUT_NOVEL
    print(table(rows, args.train_domain, novel.capitalize()))
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
