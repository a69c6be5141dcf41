"""Adaptive Computation Modules: conversion exactness, grouped inference, stages, losses, accounting, I/O, HF/timm."""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
from tiny import TokenDataset, tiny_bert, tiny_llama, training_args

from kd_plugins.acm import (
    ACMBlock,
    ACMConfig,
    acm_blocks,
    acm_param_groups,
    acm_regularizers,
    acm_stats,
    acmize,
    budget_loss,
    calibrate_gate_budget,
    collect_acm_inputs,
    collect_block_io,
    diversity_loss,
    entropy_loss,
    find_candidates,
    gate_labels,
    load_acm,
    reset_acm_stats,
    sample_fractions,
    save_acm,
    set_acm_mode,
    set_recording,
    stage1_distill,
    stage2_gates,
    token_flops,
)


def _ids(b=3, t=9, vocab=96, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, (b, t), generator=g)
    am = torch.ones_like(ids)
    am[1, -3:] = 0
    ids[1, -3:] = 0
    return {"input_ids": ids, "attention_mask": am}


def _tiny_mpnet():
    import transformers

    torch.manual_seed(0)
    return transformers.MPNetModel(
        transformers.MPNetConfig(
            vocab_size=96,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=64,
        )
    )


def _tiny_vit():
    import timm

    torch.manual_seed(0)
    kw = dict(img_size=16, patch_size=4, in_chans=1, num_classes=5, embed_dim=32, depth=2, num_heads=2)
    return timm.create_model("vit_tiny_patch16_224", **kw), kw


# --------------------------------------------------------------------------------------------- conversion
@pytest.mark.parametrize("family", ["bert", "mpnet", "llama"])
def test_slice_init_exact_at_full_k_hf(family):
    model = {"bert": lambda: tiny_bert(), "mpnet": _tiny_mpnet, "llama": lambda: tiny_llama()}[family]().eval()
    ref = copy.deepcopy(model)
    inputs = _ids()
    acmize(model, "mlp", num_learners=4, calibration=[inputs])
    assert len(acm_blocks(model)) == 2
    set_acm_mode(model, "full")
    with torch.no_grad():
        key = "logits" if family == "llama" else "last_hidden_state"
        a, b = getattr(model(**inputs), key), getattr(ref(**inputs), key)
    m = inputs["attention_mask"].bool()
    torch.testing.assert_close(a[m], b[m], atol=1e-5, rtol=1e-4)


def test_slice_init_exact_timm_mlp_and_bert_keeps_layernorm():
    vit, _ = _tiny_vit()
    vit.eval()
    ref = copy.deepcopy(vit)
    x = torch.randn(2, 1, 16, 16)
    acmize(vit, "mlp", 2, order="original")
    set_acm_mode(vit, "full")
    with torch.no_grad():
        torch.testing.assert_close(vit(x), ref(x), atol=1e-5, rtol=1e-4)
    bert = tiny_bert()
    acmize(bert, "mlp", 4)
    layer = bert.encoder.layer[0]
    assert isinstance(layer.intermediate, ACMBlock) and isinstance(layer.output.dense, nn.Identity)
    assert isinstance(layer.output.LayerNorm, nn.LayerNorm)


def test_attention_projections_low_rank():
    bert = tiny_bert().eval()
    acmize(bert, "attention", 4)
    blocks = acm_blocks(bert)
    assert len(blocks) == 8 and all(b.min_choice == 1 and b.kind == "proj" for b in blocks.values())
    b = next(iter(blocks.values()))
    assert b.width == round(32 * 32 / (4 * 64))  # paper sizing r = d/(2N) -> dense MACs
    assert b.dense_macs() == 32 * 32
    # SVD slicing is exact when N*r covers the rank
    lin = nn.Linear(8, 8)
    holder = nn.Module()
    holder.attention = nn.Module()
    holder.attention.query = lin
    ref = copy.deepcopy(lin)
    acmize(holder, "attention", 2, attention_rank=4)
    blk = holder.attention.query
    x = torch.randn(5, 8)
    torch.testing.assert_close(blk.output_k(x, 2), ref(x), atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        assert torch.all(blk.choose_k(x) >= 1)


def test_random_init_paper_sizing_and_importance_order():
    bert = tiny_bert()
    acmize(bert, "mlp", 3, init="random")
    b = next(iter(acm_blocks(bert).values()))
    assert b.width == round(64 / 3) and b.b2 is None  # paper: no output bias
    # importance ordering: learner 1 holds the largest-importance units -> smaller error at k=1 than original order
    torch.manual_seed(0)
    base = tiny_bert(hidden=32)
    inputs = _ids(b=4, t=12)
    errs = {}
    for order in ("original", "importance"):
        m = copy.deepcopy(base).eval()
        t = copy.deepcopy(base).eval()
        acmize(m, "mlp", 4, order=order, calibration=[inputs])
        io = collect_block_io(t, m, [inputs])
        errs[order] = sum(
            ((blk.output_k(io[n][0], 1) - io[n][1]) ** 2).mean().item() for n, blk in acm_blocks(m).items()
        )
    assert errs["importance"] < errs["original"]


def test_grouped_inference_equals_masked_reference():
    torch.manual_seed(0)
    for glu in (False, True):
        blk = ACMBlock(16, 12, 4, 8, nn.GELU(), glu=glu, output_bias=True).eval()
        x = torch.randn(3, 7, 16)
        k = torch.randint(0, 5, (3, 7))
        with torch.no_grad():
            torch.testing.assert_close(blk.grouped_forward(x, k), blk.reference_forward(x, k), atol=1e-5, rtol=1e-5)
            allo = blk.all_outputs(x)
            torch.testing.assert_close(allo[..., 0, :], torch.zeros(3, 7, 12))
            for kk in range(5):
                torch.testing.assert_close(allo[..., kk, :], blk.output_k(x, kk), atol=1e-5, rtol=1e-5)
            # gated eval = grouped at the gate's argmax
            out = blk(x)
            torch.testing.assert_close(out, blk.reference_forward(x, blk.choose_k(x)), atol=1e-5, rtol=1e-5)


def test_padding_tokens_skipped_and_flops_accounting():
    bert = tiny_bert().eval()
    acmize(bert, "mlp", 4)
    inputs = _ids()
    reset_acm_stats(bert, True)
    with torch.no_grad():
        bert(**inputs)
    st = acm_stats(bert)
    valid = int(inputs["attention_mask"].sum())
    blk = next(iter(acm_blocks(bert).values()))
    assert blk.stats["tokens"] == valid
    assert torch.all(blk.last_k[inputs["attention_mask"] == 0] == 0)
    # accounting by hand
    p, g = blk.learner_macs(), blk.gate_macs()
    assert p == 16 * (32 + 32) and g == 32 * 16 + 16 * 16 + 16 * 5
    tot_k = sum(float((b.stats["hist"] * torch.arange(5)).sum()) for b in acm_blocks(bert).values())
    n_blocks = len(acm_blocks(bert))
    exp = (tot_k / valid * p + n_blocks * g) / (n_blocks * 4 * p)
    assert math.isclose(st["compute_fraction"], exp, rel_tol=1e-9)
    tf = token_flops(bert)
    assert tf.shape == inputs["input_ids"].shape
    exp_tok = sum(2 * (b.last_k.double() * p + g) for b in acm_blocks(bert).values())
    torch.testing.assert_close(tf, exp_tok)
    # fixed k accounting
    set_acm_mode(bert, "fixed", k=2)
    reset_acm_stats(bert, True)
    with torch.no_grad():
        bert(**inputs)
    assert math.isclose(acm_stats(bert)["learner_fraction"], 0.5)


# ------------------------------------------------------------------------------------------------ stages
def test_stage1_loss_decreases_and_stage2_trains_gates():
    teacher = tiny_bert().eval()
    model = copy.deepcopy(teacher)
    acmize(model, "mlp", 4, init="random")
    data = [_ids(b=4, t=12, seed=s) for s in range(3)]
    io = collect_block_io(teacher, model, data)
    n = next(iter(io))
    assert io[n][0].shape == (sum(int(d["attention_mask"].sum()) for d in data), 32)
    hist = stage1_distill(model, io, steps=60, lr=3e-3, batch_tokens=64)
    assert sum(hist[-5:]) / 5 < 0.5 * sum(hist[:5]) / 5
    gate_before = copy.deepcopy(acm_blocks(model)[n].gate.state_dict())
    w1_before = acm_blocks(model)[n].w1.detach().clone()
    res = stage2_gates(model, io, steps=20, batch_tokens=64)
    assert res["loss"][-1] < res["loss"][0]
    assert torch.equal(acm_blocks(model)[n].w1, w1_before)
    assert not torch.equal(acm_blocks(model)[n].gate.l3.weight, gate_before["l3.weight"])
    assert all(h[0] == 0 and h[1] == 0 for h in res["label_hist"].values())  # paper rule: labels >= 2


def test_gate_label_rule_fixture():
    e = torch.tensor([10.0, 4.0, 2.0, 1.9, 1.85])
    assert int(gate_labels(e, tau=1 / 1.2)) == 3
    assert int(gate_labels(torch.tensor([10.0, 5.0, 2.0, 1.0, 0.5]))) == 4  # none qualifies -> N
    assert gate_labels(torch.stack([e, e]), 0.833).tolist() == [3, 3]


def test_stage3_loss_fixtures():
    frac = sample_fractions([torch.tensor([[0.0, 2.0, 4.0, 2.0]])], [1.0], [4])
    assert math.isclose(float(frac), 0.5)
    assert float(budget_loss(frac, 0.5)) == 0.0
    C = 5
    uniform = torch.eye(C)[None]  # 5 tokens spreading over the 5 choices
    assert math.isclose(float(entropy_loss([uniform])), -1.0, rel_tol=1e-6)
    same = torch.eye(C)[[2, 2, 2, 2]][None]
    assert float(entropy_loss([same])) == 0.0
    b = torch.tensor([0.25, 0.75])
    assert math.isclose(float(diversity_loss(b)), -0.25)
    # masks exclude padding
    frac = sample_fractions([torch.tensor([[4.0, 4.0, 0.0]])], [1.0], [4], [torch.tensor([[1, 1, 0]])])
    assert math.isclose(float(frac), 1.0)


def test_straight_through_task_loss_reaches_gates():
    model = tiny_bert().train()
    acmize(model, "mlp", 4)
    set_acm_mode(model, "gated", straight_through=True)
    out = model(**_ids()).last_hidden_state
    out.pow(2).mean().backward()
    g = next(iter(acm_blocks(model).values())).gate.l3.weight.grad
    assert g is not None and g.abs().sum() > 0
    model.zero_grad()
    set_acm_mode(model, "gated", straight_through=False)  # the released code: no task gradient into the gates
    model(**_ids()).last_hidden_state.pow(2).mean().backward()
    assert next(iter(acm_blocks(model).values())).gate.l3.weight.grad is None
    # regularisers do reach the gates
    set_recording(model, True)
    model(**_ids())
    reg = acm_regularizers(model, 0.5)
    set_recording(model, False)
    reg.total(0.1, 0.05, 0.05).backward()
    assert next(iter(acm_blocks(model).values())).gate.l3.weight.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------------------ I/O
def test_save_load_round_trip_bit_identical(tmp_path):
    model = tiny_bert().eval()
    acmize(model, "all", 4)
    with torch.no_grad():
        for b in acm_blocks(model).values():
            b.gate.l3.bias.add_(torch.randn_like(b.gate.l3.bias))
    path = save_acm(model, tmp_path / "acm")
    assert (path / "model.safetensors").is_file() and json.loads((path / "acm_config.json").read_text())["metadata"][
        "acm"
    ]
    loaded = load_acm(path)  # rebuilt from the saved config.json
    sd_a, sd_b = model.state_dict(), loaded.state_dict()
    assert sd_a.keys() == sd_b.keys() and all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
    inputs = _ids()
    with torch.no_grad():
        assert torch.equal(model(**inputs).last_hidden_state, loaded(**inputs).last_hidden_state)
    loaded2 = load_acm(path, model=tiny_bert(seed=5))
    assert all(torch.equal(sd_a[k], loaded2.state_dict()[k]) for k in sd_a)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_acm(model, path)
    save_acm(model, path, overwrite=True)


def test_plain_from_pretrained_refuses_an_acm_checkpoint(tmp_path):
    """Without kd_plugins (and with it), from_pretrained raises an error naming load_acm instead of initialising
    the ACM layers at random; a checkpoint written before the guard still loads with load_acm."""
    model = tiny_bert().eval()
    acmize(model, "mlp", 4)
    path = save_acm(model, tmp_path / "acm")
    script = (
        "import sys\nfrom transformers import AutoModel\n"
        "try:\n    AutoModel.from_pretrained(sys.argv[1])\nexcept ValueError as e:\n    print('refused:', e)\n"
        "assert 'kd_plugins' not in sys.modules"
    )
    r = subprocess.run(
        [sys.executable, "-c", script, str(path)],
        env=dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0 and "refused:" in r.stdout, (r.stdout, r.stderr[-3000:])
    assert "import kd_plugins" in r.stdout and "load_acm" in r.stdout
    import transformers

    with pytest.raises(ValueError, match="load_acm"):
        transformers.AutoModel.from_pretrained(path)
    loaded = load_acm(path)
    assert "transformers_weights" not in vars(loaded.config)  # the guard is not carried into the loaded model
    config = json.loads((path / "config.json").read_text())
    del config["transformers_weights"]  # as written before the guard
    (path / "config.json").write_text(json.dumps(config))
    old = load_acm(path)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), old.state_dict().values()))


def test_save_load_timm(tmp_path):
    vit, kw = _tiny_vit()
    vit.eval()
    acmize(vit, "mlp", 2)
    save_acm(vit, tmp_path / "v", build_kwargs={k: v for k, v in kw.items() if k != "num_classes"})
    v2 = load_acm(tmp_path / "v")
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(vit(x), v2(x))


# -------------------------------------------------------------------------------------------- bad input
def test_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="matched no module.*encoder.layer.0.intermediate"):
        acmize(tiny_bert(), "decoder.*")
    with pytest.raises(
        ValueError,
        match=r"divisible by num_learners=5.*num_learners in \[2, 4, 8, 16, 32, 64\].*"
        r"init='random'.*round\(64/5\) = 13",
    ):
        acmize(tiny_bert(), "mlp", 5)
    m = tiny_bert()
    acmize(m, "mlp", 5, init="random")  # random init works for any N
    with pytest.raises(ValueError, match="already has ACM blocks"):
        acmize(m, "mlp", 4)
    with pytest.raises(ValueError, match="no ACM blocks"):
        save_acm(tiny_bert(), tmp_path / "x")
    saved = tiny_bert()
    acmize(saved, "mlp", 4)
    save_acm(saved, tmp_path / "a")
    with pytest.raises(ValueError, match="architecture it was saved from"):
        load_acm(tmp_path / "a", model=tiny_bert(hidden=16))
    with pytest.raises(ValueError, match="architecture it was saved from"):
        load_acm(tmp_path / "a", model=tiny_llama())
    other = tiny_bert()
    acmize(other, "mlp", 2)
    with pytest.raises(ValueError, match="another layout"):
        load_acm(tmp_path / "a", model=other)
    with pytest.raises(FileNotFoundError, match="not an ACM checkpoint"):
        load_acm(tmp_path / "nothing")
    with pytest.raises(ValueError, match="init must be"):
        ACMConfig(init="sliced")


def test_config_parses_with_hf_argument_parser():
    from transformers import HfArgumentParser

    (cfg,) = HfArgumentParser(ACMConfig).parse_args_into_dataclasses(
        ["--num_learners", "8", "--budget", "0.25", "--init", "random", "--straight_through", "false"]
    )
    assert cfg.num_learners == 8 and cfg.budget == 0.25 and cfg.init == "random" and not cfg.straight_through


# -------------------------------------------------------------------------------------------- integrations
def test_hf_callback_trains_acm_and_saved_model_loads(tmp_path):
    from transformers import Trainer

    from kd_plugins import ACMCallback

    teacher = tiny_bert(cls="BertForSequenceClassification").eval()
    model = copy.deepcopy(teacher)
    acmize(model, "mlp", 4)
    blk = next(iter(acm_blocks(model).values()))
    before = {"w1": blk.w1.detach().clone(), "gate": blk.gate.l3.weight.detach().clone()}
    cb = ACMCallback(teacher, ACMConfig(budget=0.5))
    trainer = Trainer(
        model=model,
        args=training_args(str(tmp_path / "out"), max_steps=2),
        train_dataset=TokenDataset(n=8, labels="seq"),
        callbacks=[cb],
    )
    trainer.train()
    assert not torch.equal(blk.w1, before["w1"]) and not torch.equal(blk.gate.l3.weight, before["gate"])
    logged = [h for h in trainer.state.log_history if "acm_budget" in h]
    assert logged and {"acm_task", "acm_distill", "acm_entropy", "acm_diversity", "acm_fraction"} <= set(logged[0])
    save_acm(model, tmp_path / "acm")
    loaded = load_acm(tmp_path / "acm")
    model.eval()
    inputs = _ids()
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, loaded(**inputs).logits)
    with pytest.raises(ValueError, match="teacher is ACMized"):
        ACMCallback(teacher=model)


def test_acm_param_groups_give_gates_their_own_lr_in_trainer(tmp_path):
    """acm_param_groups: gates at gate_lr, every other trainable parameter at lr; an AdamW over them drives an
    unmodified Trainer with ACMCallback (the benchmark's stage-3 recipe) and keeps the two rates apart."""
    from transformers import Trainer

    from kd_plugins import ACMCallback

    teacher = tiny_bert().eval()
    model = copy.deepcopy(teacher)
    acmize(model, "mlp", 4)
    model.embeddings.word_embeddings.weight.requires_grad_(False)
    groups = acm_param_groups(model, lr=1e-4, gate_lr=1e-3, weight_decay=0.01)
    gates = {id(p) for b in acm_blocks(model).values() for p in b.gate.parameters()}
    assert [g["lr"] for g in groups] == [1e-4, 1e-3] and all(g["weight_decay"] == 0.01 for g in groups)
    assert {id(p) for p in groups[1]["params"]} == gates
    assert not gates & {id(p) for p in groups[0]["params"]}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for g in groups for p in g["params"]} == trainable
    assert id(model.embeddings.word_embeddings.weight) not in trainable

    blk = next(iter(acm_blocks(model).values()))
    before = {"w1": blk.w1.detach().clone(), "gate": blk.gate.l3.weight.detach().clone()}
    opt = torch.optim.AdamW(groups)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 - step / 4)
    cb = ACMCallback(teacher, ACMConfig(budget=0.5, distill_loss="cosine", hidden_weight=1.0, gate_noise=False))
    trainer = Trainer(
        model=model,
        args=training_args(str(tmp_path / "out"), max_steps=2, max_grad_norm=1.0),
        train_dataset=TokenDataset(n=8, labels=None),
        optimizers=(opt, sched),
        callbacks=[cb],
    )
    trainer.train()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-4 * 0.5, 1e-3 * 0.5])  # ours, stepped twice
    assert not torch.equal(blk.w1, before["w1"]) and not torch.equal(blk.gate.l3.weight, before["gate"])
    assert any("acm_distill" in h for h in trainer.state.log_history)
    with pytest.raises(ValueError, match="ACMized"):
        acm_param_groups(teacher, lr=1e-4, gate_lr=1e-3)


def test_timm_task_stage3_step():
    from kd_plugins.integrations.timm import ACMTask

    vit, _ = _tiny_vit()
    teacher = copy.deepcopy(vit).eval()
    acmize(vit, "mlp", 2)
    task = ACMTask(vit, config=ACMConfig(budget=0.5), teacher=teacher)
    vit.train()
    out = task(torch.randn(4, 1, 16, 16), torch.tensor([0, 1, 2, 3]))
    out["loss"].backward()
    assert {"acm_budget", "acm_entropy", "acm_diversity", "acm_distill", "output"} <= set(out)
    assert next(iter(acm_blocks(vit).values())).gate.l3.weight.grad is not None


def test_find_candidates_families():
    assert {c.family for c in find_candidates(tiny_llama()).values()} == {"llama", "proj"}
    vit, _ = _tiny_vit()
    names = find_candidates(vit)
    assert {"blocks.0.mlp", "blocks.0.attn.qkv", "blocks.0.attn.proj"} <= set(names)
    mp = find_candidates(_tiny_mpnet())
    assert "encoder.layer.0.intermediate" in mp and "encoder.layer.0.attention.attn.q" in mp
    assert "encoder.layer.0.output.dense" not in mp


def test_calibrate_gate_budget_hits_target():
    from kd_plugins.acm import calibrate_gate_budget

    teacher = tiny_bert().eval()
    model = copy.deepcopy(teacher)
    acmize(model, "mlp", 4)
    data = [_ids(b=4, t=12, seed=s) for s in range(3)]
    io = collect_block_io(teacher, model, data)
    for beta in (0.25, 0.75):
        calibrate_gate_budget(model, io, beta)
        got = []
        for n, b in acm_blocks(model).items():
            with torch.no_grad():
                got.append(b.choose_k(io[n][0]).float().mean().item() / 4)
        assert abs(sum(got) / len(got) - beta) < 0.1


def test_noiseless_training_gates_match_inference_choice():
    """gate_noise=False: training takes eval's argmax k (same output), and the gradient reaches the gate."""
    torch.manual_seed(0)
    model = tiny_bert()
    acmize(model, "mlp", 4)
    for b in acm_blocks(model).values():  # dropout-free comparison
        b.dropout = torch.nn.Identity()
    model.eval()
    ref = model(**_ids()).last_hidden_state
    ks_eval = [b.last_k.clone() for b in acm_blocks(model).values()]
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    set_acm_mode(model, "gated", gate_noise=False)
    out = model(**_ids()).last_hidden_state
    ks_train = [b.last_k for b in acm_blocks(model).values()]
    real = _ids()["attention_mask"].bool()  # eval runs nothing on padding tokens; training routes them too
    assert all(torch.equal(a[real], b[real]) for a, b in zip(ks_eval, ks_train))
    assert any(int(k[real].min()) < 4 for k in ks_train)  # a real routing, not k = N everywhere
    torch.testing.assert_close(out[real], ref[real], atol=1e-5, rtol=1e-5)
    out.pow(2).mean().backward()
    g = next(iter(acm_blocks(model).values())).gate.l3.weight.grad
    assert g is not None and g.abs().sum() > 0
    set_acm_mode(model, "gated", gate_noise=True)
    assert all(b.gate_noise for b in acm_blocks(model).values())


def test_calibrate_on_own_inputs_hits_beta():
    """collect_acm_inputs records what the ACM blocks receive; calibrating on it hits beta on those inputs."""
    torch.manual_seed(0)
    model = tiny_bert()
    acmize(model, "mlp", 4)
    batches = [_ids(seed=s) for s in range(4)]
    own = collect_acm_inputs(model, batches)
    n_real = sum(int(b["attention_mask"].sum()) for b in batches)
    assert all(z.shape == (n_real, model.config.hidden_size) for z in own.values())
    calibrate_gate_budget(model, own, 0.5)
    reset_acm_stats(model, True)
    model.eval()
    with torch.no_grad():
        for b in batches:
            model(**b)
    frac = acm_stats(model)["learner_fraction"]
    assert abs(frac - 0.5) < 0.1, frac
    with pytest.raises(ValueError, match="no cached inputs"):
        calibrate_gate_budget(model, {}, 0.5)
