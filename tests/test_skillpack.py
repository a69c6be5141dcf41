"""SkillPack (GraftLLM) unit tests on tiny random models."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
from tiny import tiny_bert, tiny_llama

from kd_plugins.skillpack import (
    ArchitectureMismatchError,
    BudgetTooSmallError,
    FingerprintMismatchError,
    IntegrityError,
    SkillPack,
    SkillPackError,
    SkillRouter,
    applied_packs,
    compress_deltas,
    energy_rank,
    fuse,
    model_fingerprint,
    parse_budget,
    ties_merge_tensors,
)
from kd_plugins.skillpack import quant as Q
from kd_plugins.skillpack.cli import skillpack_main
from kd_plugins.skillpack.delta import collect_deltas


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny tensors: several OpenMP threads only add synchronisation cost on a busy machine.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(model, state) -> bool:
    return all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def _finetune(base, seed=1, scale=0.02, rank=None):
    """A 'fine-tuned' copy: random dense (or low-rank) perturbation of every parameter."""
    ft = copy.deepcopy(base)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in ft.named_parameters():
            if rank is not None and p.dim() == 2:
                a = torch.randn(p.shape[0], rank, generator=g)
                b = torch.randn(rank, p.shape[1], generator=g)
                p.add_(scale * (a @ b) / rank**0.5)
            else:
                p.add_(scale * torch.randn(p.shape, generator=g))
    return ft


@pytest.fixture(scope="module")
def llama_pair():
    base = tiny_llama(hidden=64, layers=2)
    return base, _finetune(base)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(4, 96, (2, 10), generator=torch.Generator().manual_seed(0))


# ------------------------------------------------------------------------------------------------ quantization
@pytest.mark.parametrize("bits", [2, 4, 8, 16, 32])
def test_quant_pack_roundtrip(bits):
    x = torch.randn(100, 6, generator=torch.Generator().manual_seed(0))
    stored = Q.quantize_tensor(x, bits, 32)
    y = Q.dequantize_tensor(stored, bits, 100, 32)
    assert torch.equal(y, Q.roundtrip(x, bits, 32))
    nbytes = sum(t.numel() * t.element_size() for t in stored.values())
    assert nbytes == 6 * Q.column_bytes(100, bits, 32)
    if bits in (2, 4, 8):
        assert stored["q"].dtype == torch.uint8 and stored["q"].shape[0] == 128 * bits // 8


def test_quant_error_decreases_with_bits():
    x = torch.randn(256, 8, generator=torch.Generator().manual_seed(0))
    errs = [((Q.roundtrip(x, b) - x).norm() / x.norm()).item() for b in (2, 4, 8, 16, 32)]
    assert errs == sorted(errs, reverse=True) and errs[-1] == 0 and errs[2] < 0.01


def test_energy_rank_fixture():
    assert energy_rank(torch.tensor([3.0, 2.0, 1.0]), 0.9) == 2  # 9/14 = .643 < .9 <= 13/14 = .929
    assert energy_rank(torch.tensor([3.0, 2.0, 1.0]), 1.0) == 3
    assert energy_rank(torch.tensor([3.0, 2.0, 1.0]), 0.5) == 1


def test_parse_budget():
    assert parse_budget("5%", 1000) == 50
    assert parse_budget(0.1, 1000) == 100
    assert parse_budget("0.2", 1000) == 200
    assert parse_budget(123, 1000) == 123
    assert parse_budget("2KiB", 1000) == 2048
    assert parse_budget("1.5MB", 1) == 1_500_000
    for bad in ("lots", -3, 1.5, 0):
        with pytest.raises(SkillPackError):
            parse_budget(bad, 1000)


# --------------------------------------------------------------------------------------- extract/save/load/apply
def test_full_rank_fp32_is_lossless(llama_pair):
    base, ft = llama_pair
    pack = SkillPack.extract(base, ft, energy=1.0, bits=32, progress=False)
    m = copy.deepcopy(base)
    pack.apply(m)
    for (n, a), b in zip(m.named_parameters(), ft.parameters()):
        assert torch.allclose(a, b, atol=1e-5), n


def test_roundtrip_extract_save_load_apply(llama_pair, tmp_path, ids):
    base, ft = llama_pair
    base_state = _state(base)
    pack = SkillPack.extract(base, ft, energy=1.0, bits=8, progress=False, name="full8")
    assert _same(base, base_state)  # extraction never touches the models
    out = pack.save(tmp_path / "pack")
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "skillpack.safetensors"]
    loaded = SkillPack.load(out)
    assert loaded.name == "full8" and loaded.base_fingerprint == model_fingerprint(base)
    assert loaded.nbytes == pack.nbytes
    m = copy.deepcopy(base)
    loaded.apply(m)
    # applied == base + reconstructed delta, exactly
    params = dict(m.named_parameters())
    for name, e in loaded.entries.items():
        assert torch.equal(params[name], base_state[name] + e.delta()), name
    for name in base_state:
        if name not in loaded.entries and name in params:
            assert torch.equal(params[name], base_state[name])
    # full rank at 8 bits: close to the fine-tune
    for name, e in loaded.entries.items():
        assert e.rel_error < 0.02, (name, e.rel_error)
    with torch.no_grad():
        lf, lm, lb = ft(input_ids=ids).logits, m(input_ids=ids).logits, base(input_ids=ids).logits
    assert (lm - lf).norm() < 0.05 * (lb - lf).norm()


def test_small_deltas_are_exact_and_report(llama_pair):
    base, ft = llama_pair
    pack = SkillPack.extract(base, ft, budget="15%", progress=False)
    kinds = {e.name: e.kind for e in pack.entries.values()}
    assert kinds["model.norm.weight"] == "exact" and kinds["model.layers.0.self_attn.q_proj.weight"] == "lowrank"
    norm = pack.entries["model.norm.weight"]
    assert torch.equal(norm.delta(), ft.model.norm.weight.detach() - base.model.norm.weight.detach())
    rows = {r["name"]: r for r in pack.report()}
    q = rows["model.layers.0.self_attn.q_proj.weight"]
    assert 0 < q["rel_error"] < 1 and q["bytes"] > 0 and q["rank"] > 0
    text = pack.summary(per_module=True)
    assert "attention/lowrank" in text and "model.norm.weight" in text


def test_mixed_precision_follows_singular_values():
    base = tiny_llama(hidden=64, layers=1)
    ft = _finetune(base, rank=6, scale=0.05)
    pack = SkillPack.extract(base, ft, budget="10%", progress=False)
    e = pack.entries["model.layers.0.mlp.up_proj.weight"]
    widths = [b for b, _ in e.groups]
    assert widths == sorted(widths, reverse=True)  # leading (largest-sigma) columns get the most bits
    s = e.tensors["S"]
    start = 0
    for _, cnt in e.groups[:-1]:  # every column of a wider group beats every narrower one
        assert s[start : start + cnt].min() >= s[start + cnt :].max()
        start += cnt
    # low-rank delta: the budget goes to the 6 real components
    assert e.rank <= 8 and e.rel_error < 0.2


@pytest.mark.parametrize("budget", ["3%", "10%", 0.3])
def test_budget_respected_and_monotone(llama_pair, budget, tmp_path):
    base, ft = llama_pair
    pack = SkillPack.extract(base, ft, budget=budget, progress=False)
    cap = parse_budget(budget, pack.dense_bytes)
    assert pack.nbytes <= cap
    assert pack.nbytes >= 0.9 * cap  # the allocator uses most of it
    p = pack.save(tmp_path / "p")
    header = 300_000  # safetensors JSON header bound for this tiny model
    assert (p / "skillpack.safetensors").stat().st_size <= cap + header


def test_more_budget_less_error(llama_pair):
    base, ft = llama_pair
    errs = []
    for b in ("3%", "10%", "30%"):
        pack = SkillPack.extract(base, ft, budget=b, progress=False)
        d = sum(
            (pack.entries[n].delta() - (f - a)).pow(2).sum().item()
            if n in pack.entries
            else (f - a).pow(2).sum().item()
            for (n, a), f in zip(base.named_parameters(), ft.parameters())
        )
        errs.append(d)
    assert errs[0] > errs[1] > errs[2]


def test_uniform_policy_and_energy_bit_split(llama_pair):
    base, ft = llama_pair
    uni = SkillPack.extract(base, ft, budget="10%", policy="uniform", progress=False)
    assert uni.nbytes <= parse_budget("10%", uni.dense_bytes)
    en = SkillPack.extract(base, ft, energy=0.5, progress=False)
    e = en.entries["model.layers.0.mlp.up_proj.weight"]
    assert [b for b, _ in e.groups][0] == 8 and e.groups[-1][0] == 2
    assert e.rank == energy_rank(
        torch.linalg.svdvals(
            ft.model.layers[0].mlp.up_proj.weight.detach() - base.model.layers[0].mlp.up_proj.weight.detach()
        ),
        0.5,
    )


@pytest.mark.parametrize("policy", ["lowrank", "exact", "sparse", "skip"])
def test_embedding_policies(llama_pair, policy):
    base, ft = llama_pair
    pack = SkillPack.extract(base, ft, budget="40%", embeddings=policy, sparse_density=0.05, progress=False)
    name = "model.embed_tokens.weight"
    d = ft.model.embed_tokens.weight.detach() - base.model.embed_tokens.weight.detach()
    if policy == "skip":
        assert name not in pack.entries and name in pack.info["dropped"]
        return
    e = pack.entries[name]
    assert e.module_type == "embedding"
    assert e.kind == {"lowrank": "lowrank", "exact": "exact", "sparse": "sparse"}[policy]
    if policy == "exact":
        assert torch.equal(e.delta(), d)
    if policy == "sparse":
        kept = e.delta() != 0
        assert kept.sum() == round(0.05 * d.numel())
        assert d.abs()[kept].min() >= d.abs()[~kept].max()


def test_remove_restores_base_exactly(llama_pair, ids):
    base, ft = llama_pair
    a = SkillPack.extract(base, ft, budget="10%", progress=False)
    b = SkillPack.extract(base, _finetune(base, seed=7), budget="10%", progress=False)
    m = copy.deepcopy(base)
    s0 = _state(m)
    a.apply(m)
    s_a = _state(m)
    b.apply(m, scale=0.5)
    assert [p for p, _ in applied_packs(m)] == [a, b]
    a.remove(m)  # not the last one applied
    b.remove(m)
    assert _same(m, s0) and not applied_packs(m)
    a.apply(m)
    assert _same(m, s_a)
    with pytest.raises(SkillPackError, match="already applied"):
        a.apply(m)
    a.remove(m)
    assert _same(m, s0)
    with pytest.raises(SkillPackError, match="not applied"):
        a.remove(m)


# ---------------------------------------------------------------------------------------------------- bad inputs
def test_architecture_mismatch(llama_pair):
    base, ft = llama_pair
    other = tiny_llama(hidden=32, layers=2)
    deeper = tiny_llama(hidden=64, layers=3)
    s = _state(base)
    with pytest.raises(ArchitectureMismatchError, match="shapes differ"):
        SkillPack.extract(base, other, budget="5%", progress=False)
    with pytest.raises(ArchitectureMismatchError, match="only in fine-tuned"):
        SkillPack.extract(base, deeper, budget="5%", progress=False)
    with pytest.raises(ArchitectureMismatchError):
        SkillPack.extract(base, tiny_bert(hidden=64), budget="5%", progress=False)
    with pytest.raises(SkillPackError, match="identical"):
        SkillPack.extract(base, copy.deepcopy(base), budget="5%", progress=False)
    pack = SkillPack.extract(base, ft, budget="5%", progress=False)
    so = _state(other)
    with pytest.raises(ArchitectureMismatchError, match="not changed"):
        pack.apply(other)
    assert _same(other, so) and _same(base, s)


def test_fingerprint_mismatch_leaves_model_untouched(llama_pair):
    base, ft = llama_pair
    pack = SkillPack.extract(base, ft, budget="5%", progress=False)
    wrong = tiny_llama(hidden=64, layers=2, seed=3)  # same architecture, other weights
    s = _state(wrong)
    with pytest.raises(FingerprintMismatchError, match="not the base"):
        pack.apply(wrong)
    assert _same(wrong, s) and not applied_packs(wrong)
    with pytest.warns(UserWarning, match="applying anyway"):
        pack.apply(wrong, strict=False)
    pack.remove(wrong)
    assert _same(wrong, s)


def test_budget_too_small(llama_pair):
    base, ft = llama_pair
    s = _state(base)
    with pytest.raises(BudgetTooSmallError, match="too small"):
        SkillPack.extract(base, ft, budget=100, progress=False)
    with pytest.raises(BudgetTooSmallError):  # covers the exact deltas but no rank-1 component
        SkillPack.extract(base, ft, budget=1300, progress=False)
    assert _same(base, s)


@pytest.mark.parametrize("policy", ["module-aware", "uniform"])
def test_budget_too_small_names_the_smallest_budget_that_works(llama_pair, policy):
    base, ft = llama_pair
    items, cache = collect_deltas(base, ft), {}
    with pytest.raises(BudgetTooSmallError, match=r"smallest budget that works is [\d,]+ bytes") as err:
        SkillPack.extract(base, ft, budget=1300, policy=policy, progress=False)
    need, pct = re.search(r"Pass budget=(\d+) or budget='([\d.]+%)'", str(err.value)).groups()
    assert err.value.smallest_budget == int(need)
    for budget in (int(need), pct):  # both suggestions work ...
        pack = compress_deltas(items, "fp", budget=budget, policy=policy, progress=False, cache=cache)
        assert 0 < pack.nbytes <= parse_budget(budget, pack.dense_bytes)
    with pytest.raises(BudgetTooSmallError):  # ... and it is the smallest
        compress_deltas(items, "fp", budget=int(need) - 1, policy=policy, progress=False, cache=cache)


def test_default_budget_is_five_percent(llama_pair):
    base, ft = llama_pair
    pack = SkillPack.extract(base, ft, progress=False)  # 5% holds this model's exact deltas: used as is
    assert pack.info["budget_bytes"] == parse_budget("5%", pack.dense_bytes) >= pack.nbytes


def test_corrupt_and_truncated_pack(llama_pair, tmp_path):
    base, ft = llama_pair
    pack = SkillPack.extract(base, ft, budget="10%", progress=False)
    d = pack.save(tmp_path / "p")
    with pytest.raises(FileExistsError):
        pack.save(d)
    pack.save(d, overwrite=True)
    f = d / "skillpack.safetensors"
    raw = bytearray(f.read_bytes())
    # flip one byte in the tensor data (the end of the file is data, not header)
    raw[-10] ^= 0xFF
    f.write_bytes(bytes(raw))
    with pytest.raises(IntegrityError, match="checksum mismatch"):
        SkillPack.load(d)
    pack.save(d, overwrite=True)
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(IntegrityError, match="truncated"):
        SkillPack.load(d)
    pack.save(d, overwrite=True)
    man = json.loads((d / "manifest.json").read_text())
    man.pop("tensor_file_bytes")
    (d / "manifest.json").write_text(json.dumps(man))
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(IntegrityError):  # safetensors itself refuses the short file
        SkillPack.load(d)
    (d / "manifest.json").write_text("{not json")
    with pytest.raises(IntegrityError, match="not valid JSON"):
        SkillPack.load(d)
    with pytest.raises(IntegrityError, match="not a SkillPack directory"):
        SkillPack.load(tmp_path / "missing")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left behind


# --------------------------------------------------------------------------------------------------------- fusing
def test_ties_math_on_known_tensors():
    t1 = torch.tensor([1.0, -2.0, 0.5, 3.0])
    t2 = torch.tensor([-1.5, -1.0, 0.2, 2.0])
    # density 1: no trimming. signs: sum = [-0.5, -3, 0.7, 5] -> [-, -, +, +]
    # disjoint means: [-1.5, (-2-1)/2, (0.5+0.2)/2, (3+2)/2]
    assert torch.allclose(ties_merge_tensors([t1, t2], density=1.0), torch.tensor([-1.5, -1.5, 0.35, 2.5]))
    # density 0.5: t1 keeps {-2, 3}, t2 keeps {-1.5, 2} -> elected [-, -, 0, +]
    assert torch.allclose(ties_merge_tensors([t1, t2], density=0.5), torch.tensor([-1.5, -2.0, 0.0, 2.5]))
    assert torch.allclose(ties_merge_tensors([t1, t2], density=0.5, scale=2.0), torch.tensor([-3.0, -4.0, 0.0, 5.0]))


def test_fuse_task_arithmetic_and_ties(llama_pair):
    base, ft = llama_pair
    a = SkillPack.extract(base, ft, budget="10%", progress=False, name="a")
    b = SkillPack.extract(base, _finetune(base, seed=5), budget="10%", progress=False, name="b")
    ta = fuse([a, b], "task_arithmetic", weights=[0.7, 0.3])
    for n, e in ta.entries.items():
        want = 0.7 * a.delta(n) + 0.3 * b.delta(n)
        assert torch.allclose(e.delta(), want, atol=1e-6), n
    q = "model.layers.0.self_attn.q_proj.weight"
    assert ta.entries[q].kind == "lowrank" and ta.entries[q].rank == a.entries[q].rank + b.entries[q].rank
    assert ta.nbytes <= a.nbytes + b.nbytes + 1000  # lossless concatenation: stays compressed
    ties = fuse([a, b], "ties", density=0.3)
    for n, e in ties.entries.items():
        assert torch.allclose(e.delta(), ties_merge_tensors([a.delta(n), b.delta(n)], density=0.3)), n
    small = fuse([a, b], "ties", density=0.3, budget="10%")
    assert small.nbytes <= parse_budget("10%", small.dense_bytes)
    m = copy.deepcopy(base)
    s = _state(m)
    ta.apply(m)
    ta.remove(m)
    assert _same(m, s)
    other = SkillPack.extract(tiny_llama(hidden=64, layers=2, seed=9), ft, budget="10%", progress=False)
    with pytest.raises(SkillPackError, match="different base"):
        fuse([a, other])
    with pytest.raises(SkillPackError, match="method"):
        fuse([a, b], "average")


def test_router_picks_the_right_pack(llama_pair, ids):
    base, ft = llama_pair
    a = SkillPack.extract(base, ft, budget="10%", progress=False, name="a")
    b = SkillPack.extract(base, _finetune(base, seed=5), budget="10%", progress=False, name="b")
    routed = fuse([a, b], "router")
    # two "skills" whose inputs live in different token ranges; features = bag of token ids
    g = torch.Generator().manual_seed(0)
    skill_a = [torch.randint(4, 40, (10,), generator=g) for _ in range(12)]
    skill_b = [torch.randint(56, 96, (10,), generator=g) for _ in range(12)]

    def featurize(xs):
        return torch.stack([torch.bincount(x, minlength=96).float() for x in xs])

    routed.fit_router({"a": skill_a[:4], "b": skill_b[:4]}, featurize)  # a few examples of each skill
    test_inputs = skill_a[4:] + skill_b[4:]
    assert routed.route(test_inputs) == [0] * 8 + [1] * 8

    def run(model, xs):
        with torch.no_grad():
            return model(input_ids=torch.stack(xs)).logits

    m = copy.deepcopy(base)
    s = _state(m)
    outs, routes = routed.run(m, [skill_b[5], skill_a[5]], run)
    assert routes == [1, 0] and _same(m, s)
    for x, pack, out in ((skill_b[5], b, outs[0]), (skill_a[5], a, outs[1])):
        pack.apply(m)
        assert torch.allclose(out, run(m, [x])[0])
        pack.remove(m)
    # manual map + adding a skill leaves the others alone
    manual = fuse([a, b], "router", router=SkillRouter.manual({"chat": 0, "code": 1}, key_fn=lambda x: x["task"]))
    assert manual.route([{"task": "code"}, {"task": "chat"}]) == [1, 0]
    manual.add(fuse([a, b], "task_arithmetic"), name="both")
    assert manual.packs[:2] == [a, b] and manual.names == ["a", "b", "both"]
    with pytest.raises(SkillPackError, match="no pack for key"):
        manual.route([{"task": "math"}])


# ------------------------------------------------------------------------------------------------------------ peft
def test_peft_export_matches_lowrank_apply(llama_pair, tmp_path, ids):
    from peft import PeftModel

    base, ft = llama_pair
    pack = SkillPack.extract(base, ft, budget="10%", progress=False)
    info = pack.to_lora(tmp_path / "lora")
    assert "model.norm.weight" in info["skipped"] and "lm_head" in info["modules"]
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "lora").eval()
    m = copy.deepcopy(base)
    # the exported part: low-rank entries on Linear layers (the low-rank embedding has no LoRA-Linear form)
    assert "model.embed_tokens.weight" in info["skipped"]
    pack.subset(names=[f"{mod}.weight" for mod in info["modules"]]).apply(m)
    with torch.no_grad():
        assert torch.allclose(peft_model(input_ids=ids).logits, m(input_ids=ids).logits, atol=1e-4)
        assert not torch.allclose(base(input_ids=ids).logits, m(input_ids=ids).logits, atol=1e-3)
    cfg = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and len(cfg["rank_pattern"]) == len(info["modules"])


def test_lora_import(tmp_path, ids):
    from peft import LoraConfig, PeftModel, get_peft_model

    base = tiny_llama(hidden=64, layers=2)
    peft_model = get_peft_model(
        copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    )
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    peft_model.save_pretrained(tmp_path / "adapter")
    pack = SkillPack.from_lora(tmp_path / "adapter", base)
    assert len(pack.entries) == 6 and all(e.rank == 4 for e in pack.entries.values())
    m = copy.deepcopy(base)
    pack.apply(m)
    merged = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "adapter").merge_and_unload()
    for (n, a), b in zip(m.named_parameters(), merged.parameters()):
        assert torch.allclose(a, b, atol=1e-6), n
    q8 = SkillPack.from_lora(tmp_path / "adapter", base, bits=8)
    assert q8.nbytes < pack.nbytes / 3
    re = SkillPack.from_lora(tmp_path / "adapter", base, budget=0.02)
    assert re.nbytes <= parse_budget(0.02, re.dense_bytes)
    with pytest.raises(ArchitectureMismatchError):
        SkillPack.from_lora(tmp_path / "adapter", tiny_llama(hidden=32, layers=2))


# ------------------------------------------------------------------------------------------------------------- CLI
def test_cli_extract_info_apply(llama_pair, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    base, ft = llama_pair
    base.save_pretrained(tmp_path / "base")
    ft.save_pretrained(tmp_path / "ft")
    assert (
        skillpack_main(
            ["extract", str(tmp_path / "base"), str(tmp_path / "ft"), str(tmp_path / "pack"), "--budget", "10%"]
        )
        == 0
    )
    assert "saved to" in capsys.readouterr().out
    assert skillpack_main(["info", str(tmp_path / "pack")]) == 0
    assert "checksums OK" in capsys.readouterr().out
    assert skillpack_main(["apply", str(tmp_path / "pack"), str(tmp_path / "base"), str(tmp_path / "out")]) == 0
    out = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    pack = SkillPack.load(tmp_path / "pack")
    m = copy.deepcopy(base)
    pack.apply(m)
    for a, b in zip(out.parameters(), m.parameters()):
        assert torch.equal(a, b)
    assert skillpack_main(["export-lora", str(tmp_path / "pack"), str(tmp_path / "lora")]) == 0
    # errors: clear message, non-zero exit, nothing written
    assert (
        skillpack_main(
            ["extract", str(tmp_path / "base"), str(tmp_path / "ft"), str(tmp_path / "p2"), "--budget", "10"]
        )
        == 1
    )
    assert "too small" in capsys.readouterr().err and not (tmp_path / "p2").exists()
    wrong = tiny_llama(hidden=64, layers=2, seed=4)
    wrong.save_pretrained(tmp_path / "wrong")
    assert skillpack_main(["apply", str(tmp_path / "pack"), str(tmp_path / "wrong"), str(tmp_path / "o2")]) == 1
    assert "fingerprint" in capsys.readouterr().err and not (tmp_path / "o2").exists()
    from kd_plugins.cli import main

    assert main(["skillpack", "info", str(tmp_path / "pack")]) == 0


def test_tall_matrix_svd_path():
    from kd_plugins.skillpack.lowrank import thin_svd

    g = torch.Generator().manual_seed(0)
    d = torch.randn(4200, 12, generator=g) @ torch.randn(12, 250, generator=g)  # embedding-like: tall, low rank
    d[::3] = 0  # row-sparse, like an embedding delta
    for mat in (d, d.T.contiguous()):
        u, s, v = thin_svd(mat)
        assert s.numel() == 12 and torch.all(s[:-1] >= s[1:])
        assert torch.allclose((u * s) @ v.T, mat, atol=1e-4 * s[0].item())
        assert torch.allclose(u.T @ u, torch.eye(12), atol=1e-4)
