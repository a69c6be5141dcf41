"""The sharded offline teacher cache: bit packing, value encodings, `kd-plugins cache-teacher`, streaming reads,
equality with the in-memory cache and the dense loss, refusals (mismatch, truncation, corruption), atomicity."""

import json
import math

import pytest
import torch
from tiny import TokenDataset, tiny_llama, training_args
from transformers import AutoTokenizer, Trainer

from kd_plugins import (
    DistillationCallback,
    DistillationConfig,
    DistillationEngine,
    TeacherCache,
    build_teacher_cache,
    load_teacher_cache,
    save_teacher_cache,
)
from kd_plugins._checkpoint import CheckpointError
from kd_plugins.cli import main as cli_main
from kd_plugins.distill.cache import tokenizer_fingerprint
from kd_plugins.distill.cache_codec import (
    decode_log_probs,
    encode_log_probs,
    index_bits,
    pack_indices,
    row_bytes,
    unpack_indices,
)
from kd_plugins.distill.cache_store import MANIFEST, file_sha256
from kd_plugins.distill.offline_cache import cache_teacher, read_cache_data

TEXTS = [
    "It is a truth universally acknowledged, that a single man",
    "in possession of a good fortune, must be in want of a wife.",
    "However little known the feelings or views of such a man may be",
    "on his first entering a neighbourhood, this truth is so well fixed",
    "in the minds of the surrounding families,",
    "that he is considered the rightful property of some one or other of their daughters.",
    "My dear Mr. Bennet, said his lady to him one day,",
    "have you heard that Netherfield Park is let at last?",
]


def _char_tokenizer(extra: str = ""):
    """A real fast tokenizer, one token per character (no download)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set("".join(TEXTS) + extra))
    vocab = {"<pad>": 0, "<s>": 1, "<unk>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    t.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", unk_token="<unk>", pad_token="<pad>")


def _batch(ds, idx):
    items = [ds[i] for i in idx]
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


def _lm_loss(teacher_or_cache, student, batch, cfg):
    engine = DistillationEngine(teacher_or_cache, DistillationConfig(**cfg))
    engine.setup(student)
    with torch.no_grad():
        out = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return engine.compute(batch, out)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny causal LM with its tokenizer saved like a Hub checkpoint, and a .jsonl of texts."""
    d = tmp_path_factory.mktemp("teacher")
    tiny_llama(seed=1).save_pretrained(d / "model")
    _char_tokenizer().save_pretrained(d / "model")
    data = d / "data.jsonl"
    data.write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(TEXTS)) + "\n")
    return d / "model", data


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """A bf16 cache of TokenDataset(pad_last=3) at T=2, two examples per shard."""
    ds = TokenDataset(pad_last=3)
    path = tmp_path_factory.mktemp("caches") / "c"
    cache_teacher(tiny_llama(seed=1), ds, path, top_k=16, temperature=2.0, shard_tokens=20, progress=False)
    return path, ds


# ------------------------------------------------------------------------------------------------------ codec
@pytest.mark.parametrize("vocab", [1, 2, 3, 5, 96, 255, 256, 257, 1000, 49152, 50257, 2**20 + 3])
@pytest.mark.parametrize("k", [1, 7, 32])
def test_pack_unpack_round_trip_is_exact(vocab, k):
    g = torch.Generator().manual_seed(vocab + k)
    idx = torch.randint(0, vocab, (37, k), generator=g)
    idx[0], idx[1] = vocab - 1, 0  # the extremes
    packed = pack_indices(idx, vocab)
    assert packed.dtype == torch.uint8 and packed.shape == (37, math.ceil(k * index_bits(vocab) / 8))
    assert torch.equal(unpack_indices(packed, k, vocab), idx)


def test_index_bits_and_row_bytes():
    assert [index_bits(v) for v in (1, 2, 3, 4, 5, 96, 256, 257, 49152, 50257)] == [1, 1, 2, 2, 3, 7, 8, 9, 16, 16]
    assert row_bytes(32, 49152, "bf16") == 64 + 64  # the goal: <= 200 bytes per token at k = 32
    assert row_bytes(32, 49152, "head_tail") == 64 + 16 + 12
    with pytest.raises(ValueError, match=r"\[0, 96\)"):
        pack_indices(torch.tensor([[96]]), 96)
    with pytest.raises(ValueError, match="head_tail.*lower head_k"):
        row_bytes(8, 96, "head_tail", head_k=6)


def _zipf_rows(n=64, k=32, vocab=4096, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = 1.5 * torch.randn(n, vocab, generator=g) - 1.1 * torch.arange(1, vocab + 1).log()
    return torch.log_softmax(logits, -1).topk(k).values


def test_value_encodings():
    lp = _zipf_rows()
    assert torch.equal(decode_log_probs(encode_log_probs(lp, "fp32"), "fp32", 32), lp)
    bf_enc = encode_log_probs(lp, "bf16")
    assert bf_enc["probs"].dtype == torch.bfloat16
    bf = decode_log_probs(bf_enc, "bf16", 32)
    assert float((bf.exp() / lp.exp() - 1).abs().max()) <= 2**-8  # relative error of every probability
    ht_enc = encode_log_probs(lp, "head_tail", head_k=8, tail_degree=2)
    assert ht_enc["head_probs"].dtype == torch.bfloat16 and ht_enc["tail_coeffs"].shape == (64, 3)
    ht = decode_log_probs(ht_enc, "head_tail", 32)
    assert torch.equal(ht[:, :8], bf[:, :8])
    # the fitted tail holds the teacher's tail mass, and stays close value by value
    torch.testing.assert_close(torch.logsumexp(ht[:, 8:], -1), torch.logsumexp(lp[:, 8:], -1), atol=1e-4, rtol=0)
    assert float((ht[:, 8:] - lp[:, 8:]).abs().mean()) < 0.25
    for dec in (bf, ht):
        assert float(torch.logsumexp(dec, -1).max()) <= 0.0


# ------------------------------------------------------------------------------------------------------ CLI
def test_cli_writes_a_checksummed_sharded_cache(saved, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    teacher_dir, data = saved
    out = tmp_path / "cache"
    argv = [str(teacher_dir), str(data), str(out), "--top-k", "8", "--temperature", "2", "--shard-tokens", "100"]
    assert cli_main(["cache-teacher", *argv, "--batch-size", "3", "--max-length", "48"]) == 0
    manifest = json.loads((out / MANIFEST).read_text())
    assert len(manifest["shards"]) > 1 and manifest["num_rows"] == sum(min(len(t), 48) for t in TEXTS)
    for record in [manifest["index"], *manifest["shards"]]:
        assert record["sha256"] == file_sha256(out / record["file"])
    tok = AutoTokenizer.from_pretrained(teacher_dir)
    cache = load_teacher_cache(out, tokenizer=tok, temperature=2.0, vocab_size=96, kind="topk")
    meta = cache.metadata
    assert (meta["top_k"], meta["num_examples"], meta["tokenizer_fingerprint"]) == (8, 8, tokenizer_fingerprint(tok))
    # a row is the teacher's own top-k at T=2 (probabilities in bf16)
    ex = read_cache_data(data, tok, max_length=48)[5]
    idx, lp = cache.lookup({k: v[None] for k, v in ex.items()})["teacher_topk"]
    with torch.no_grad():
        logits = AutoModelForCausalLM.from_pretrained(teacher_dir)(input_ids=ex["input_ids"][None]).logits[0]
    want = torch.log_softmax(logits / 2, -1).topk(8)
    assert torch.equal(idx[0], want.indices)
    torch.testing.assert_close(lp[0].exp(), want.values.exp(), rtol=2**-8, atol=1e-6)
    with pytest.raises(FileExistsError, match="not empty"):
        cli_main(["cache-teacher", *argv])


def test_cli_writes_a_sampled_cache(saved, tmp_path):
    teacher_dir, data = saved
    out = tmp_path / "cache"
    argv = [str(teacher_dir), str(data), str(out), "--top-k", "8", "--selection", "sampled", "--seed", "3"]
    assert cli_main(["cache-teacher", *argv, "--max-length", "48"]) == 0
    cache = load_teacher_cache(out, temperature=1.0, vocab_size=96, kind="topk")
    assert (cache.metadata["selection"], cache.metadata["sample_seed"]) == ("sampled", 3)
    ex = read_cache_data(data, AutoTokenizer.from_pretrained(teacher_dir), max_length=48)[2]
    idx, lp = cache.lookup({k: v[None] for k, v in ex.items()})["teacher_topk"]
    torch.testing.assert_close(lp.exp().sum(-1), torch.ones(idx.shape[:-1]), rtol=0, atol=2e-2)  # bf16 weights
    assert all(len(set(row.tolist())) == 8 for row in idx.reshape(-1, 8))


def test_cli_writes_a_lowrank_cache(saved, tmp_path):
    teacher_dir, data = saved
    out = tmp_path / "cache"
    argv = [str(teacher_dir), str(data), str(out), "--top-k", "8", "--kind", "lowrank", "--rank", "8"]
    assert cli_main(["cache-teacher", *argv, "--fit-tokens", "64", "--max-length", "48"]) == 0
    cache = load_teacher_cache(out, temperature=1.0, vocab_size=96, kind="lowrank")
    assert cache.metadata["rank"] == 8 and cache.tensors["tail_weight"].shape == (96, 8)
    ex = read_cache_data(data, AutoTokenizer.from_pretrained(teacher_dir), max_length=48)[1]
    logits = cache.lookup({k: v[None] for k, v in ex.items()})["logits"]
    torch.testing.assert_close(logits.exp().sum(-1), torch.ones(logits.shape[:-1]), rtol=0, atol=1e-4)


def test_read_cache_data_sources(saved, tmp_path):
    from datasets import Dataset

    teacher_dir, data = saved
    tok = _char_tokenizer()
    from_jsonl = read_cache_data(data, tok, max_length=10)
    txt = tmp_path / "d.txt"
    txt.write_text("\n\n".join(TEXTS))
    Dataset.from_dict({"body": TEXTS}).save_to_disk(str(tmp_path / "ds"))
    from_txt = read_cache_data(txt, tok, max_length=10)
    from_disk = read_cache_data(tmp_path / "ds", tok, text_column="body", max_length=10)
    assert all(e["input_ids"].numel() == 10 for e in from_jsonl) and len(from_jsonl) == len(TEXTS)
    for other in (from_txt, from_disk):
        assert [e["input_ids"].tolist() for e in other] == [e["input_ids"].tolist() for e in from_jsonl]
    with pytest.raises(ValueError, match="text column 'text'"):
        read_cache_data(tmp_path / "ds", tok)
    with pytest.raises(ValueError, match="neither a datasets.load_from_disk directory"):
        read_cache_data(tmp_path / "d.csv", tok)


# ------------------------------------------------------------------------------------------------------ losses
@pytest.mark.parametrize("value_format,rel", [("fp32", 1e-6), ("bf16", 2e-3), ("head_tail", 5e-3)])
def test_sharded_loss_equals_the_in_memory_cache(tmp_path, value_format, rel):
    teacher, student = tiny_llama(seed=1), tiny_llama(seed=2)
    ds = TokenDataset(pad_last=3)
    cfg = dict(loss_terms="kl", temperature=2.0, fused_loss=False)
    memory = build_teacher_cache(teacher, ds, kind="topk", top_k=32, temperature=2.0, progress=False)
    disk = cache_teacher(
        teacher,
        ds,
        tmp_path / "c",
        top_k=32,
        temperature=2.0,
        value_format=value_format,
        shard_tokens=30,
        batch_size=32,  # the batches build_teacher_cache makes: bit-identical teacher logits
        progress=False,
    )
    batch = _batch(ds, [3, 0, 7, 10])
    want, got = _lm_loss(memory, student, batch, cfg), _lm_loss(disk, student, batch, cfg)
    assert float(got.loss) == pytest.approx(float(want.loss), rel=rel)
    if value_format == "fp32":
        assert torch.equal(disk.lookup(batch)["teacher_topk"][0], memory.lookup(batch)["teacher_topk"][0])


@pytest.mark.parametrize("loss", ["kl", "jsd", "tvd"])
def test_sharded_cache_over_the_full_vocabulary_equals_the_dense_loss(tmp_path, loss):
    teacher, student = tiny_llama(seed=1), tiny_llama(seed=2)
    ds = TokenDataset(pad_last=3)
    cfg = dict(loss_terms=loss, temperature=2.0, fused_loss=False)
    batch = _batch(ds, [3, 0, 7, 10])
    dense = _lm_loss(teacher, student, batch, cfg)
    full = cache_teacher(teacher, ds, tmp_path / "c", top_k=96, temperature=2.0, value_format="fp32", progress=False)
    assert float(_lm_loss(full, student, batch, cfg).loss) == pytest.approx(float(dense.loss), rel=1e-5)


def test_callback_trains_from_a_streaming_cache(sharded, tmp_out):
    path, ds = sharded
    cb = DistillationCallback(TeacherCache(path, max_open_shards=2), loss_terms="kl", temperature=2.0)
    args = training_args(tmp_out, max_steps=3)
    trainer = Trainer(model=tiny_llama(seed=2), args=args, train_dataset=ds, callbacks=[cb])
    trainer.train()
    hist = [h for h in trainer.state.log_history if "kd_kl" in h]
    assert len(hist) == 3 and all(math.isfinite(h["kd_kl"]) for h in hist)
    assert cb.teacher is None


# ------------------------------------------------------------------------------------------------------ streaming
def test_streaming_reads_only_the_shards_a_batch_needs(sharded):
    path, ds = sharded
    cache = TeacherCache(path, max_open_shards=2)
    store = cache.store
    n_shards = len(store.shards)
    assert n_shards >= 6 and store.opens == 0 and set(cache.tensors) == {"keys", "offsets"}
    shard_of = {}
    for i in range(len(ds)):
        (j,) = cache.rows_of(ds[i]["input_ids"][None], ds[i]["attention_mask"][None])
        row = int(store.index["offsets"][j])
        shard_of[i] = int(torch.searchsorted(store._starts, torch.tensor(row), right=True)) - 1
    same = [i for i in range(len(ds)) if shard_of[i] == shard_of[0]]
    cache.lookup(_batch(ds, same))
    assert store.opens == 1  # one shard opened, the others untouched
    cache = TeacherCache(path, max_open_shards=2)
    for i in sorted(shard_of, key=shard_of.get):  # a pass in shard order opens each shard once, 2 at a time at most
        cache.lookup(_batch(ds, [i]))
        assert len(cache.store._open) <= 2
    assert cache.store.opens == n_shards
    # a copy made with save_teacher_cache streams the same rows
    copy = TeacherCache(save_teacher_cache(cache, path.parent / "copy"))
    b = _batch(ds, [1, 4])
    assert torch.equal(copy.lookup(b)["teacher_topk"][1], cache.lookup(b)["teacher_topk"][1])


# ------------------------------------------------------------------------------------------------------ refusals
def test_a_cache_that_does_not_match_is_refused(sharded):
    path, ds = sharded
    with pytest.raises(ValueError, match="another teacher.*cache-teacher"):
        load_teacher_cache(path, teacher=tiny_llama(seed=3))
    with pytest.raises(ValueError, match="records no tokenizer"):
        load_teacher_cache(path, tokenizer=_char_tokenizer())
    with pytest.raises(ValueError, match="temperature 2.0, not 1.0.*--temperature 1.0"):
        load_teacher_cache(path, temperature=1.0)
    with pytest.raises(ValueError, match="another dataset \\(16 examples; this one has 16, 16 of them not"):
        load_teacher_cache(path, dataset=TokenDataset(seed=5))
    with pytest.raises(ValueError, match="vocabulary of 96 tokens, not 80"):
        load_teacher_cache(path, vocab_size=80)
    cache = TeacherCache(path)
    with pytest.raises(ValueError, match="temperature 2.0 but the 'kl' term uses 1.0.*--temperature 1.0"):
        DistillationEngine(cache, DistillationConfig(loss_terms="kl", temperature=1.0)).setup(tiny_llama(seed=2))
    with pytest.raises(ValueError, match="vocabulary of 96 tokens but the student has 80"):
        DistillationEngine(cache, DistillationConfig(loss_terms="kl", temperature=2.0)).setup(tiny_llama(vocab=80))
    batch = _batch(ds, [0, 1])
    batch["input_ids"][0, 0] += 1
    with pytest.raises(KeyError, match="1 of the 2 examples .* cache-teacher"):
        cache.lookup(batch)


def test_tokenizer_mismatch_is_refused(saved, tmp_path):
    teacher_dir, data = saved
    path = tmp_path / "c"
    from transformers import AutoTokenizer

    cache_teacher(teacher_dir, data, path, top_k=4, max_length=48, progress=False)
    load_teacher_cache(path, tokenizer=AutoTokenizer.from_pretrained(teacher_dir))
    with pytest.raises(ValueError, match="another tokenizer.*cache-teacher"):
        load_teacher_cache(path, tokenizer=_char_tokenizer(extra="#"))


def test_truncated_missing_or_corrupt_shards_are_refused(sharded, tmp_path):
    import shutil

    src, ds = sharded
    path = tmp_path / "c"
    shutil.copytree(src, path)
    shard = path / "shard-00001.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[:-10])
    with pytest.raises(CheckpointError, match="shard-00001.*truncated.*cache-teacher"):
        TeacherCache(path)
    shard.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))  # same size, one byte flipped
    cache = TeacherCache(path)  # sizes match: refused when the shard is first read
    with pytest.raises(CheckpointError, match="checksum mismatch in .*shard-00001"):
        for i in range(len(ds)):
            cache.lookup(_batch(ds, [i]))
    shard.unlink()
    with pytest.raises(CheckpointError, match="shard-00001.safetensors is missing"):
        load_teacher_cache(path)


def test_a_failure_mid_write_leaves_no_cache(tmp_path, monkeypatch):
    teacher, ds = tiny_llama(seed=1), TokenDataset()
    forward, calls = teacher.forward, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("teacher died")
        return forward(*args, **kwargs)

    monkeypatch.setattr(teacher, "forward", failing)
    with pytest.raises(RuntimeError, match="teacher died"):
        cache_teacher(teacher, ds, tmp_path / "c", top_k=4, batch_size=2, shard_tokens=12, progress=False)
    assert list(tmp_path.iterdir()) == []  # neither OUT_DIR nor its temporary sibling
    old = cache_teacher(tiny_llama(seed=1), ds, tmp_path / "c", top_k=4, progress=False)
    calls.clear()
    with pytest.raises(RuntimeError, match="teacher died"):
        cache_teacher(teacher, ds, tmp_path / "c", top_k=8, batch_size=2, overwrite=True, progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["c"] and TeacherCache(tmp_path / "c").top_k == old.top_k == 4
