"""Multi-exit self-distillation: exits, loss, truncation parity, early exit, HF Trainer and timm integration."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn
from tiny import TokenDataset, tiny_bert, tiny_llama, training_args

from kd_plugins.multiexit import (
    MultiExitConfig,
    add_exits,
    early_exit_classify,
    early_exit_embed,
    early_exit_generate,
    exit_embeddings,
    exit_outputs,
    exit_weights,
    get_exits,
    multi_exit_loss,
    plot_accuracy_vs_depth,
    remove_exits,
    simulate_early_exit,
    truncate,
)


def _ids(b=3, t=9, vocab=96, seed=1, pad=True):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, (b, t), generator=g)
    am = torch.ones_like(ids)
    if pad:
        am[1, -3:] = 0
        ids[1, -3:] = 0
    return {"input_ids": ids, "attention_mask": am}


def _perturb(module: nn.Module, seed=0, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def _tiny_mpnet(layers=4):
    import transformers

    torch.manual_seed(0)
    return transformers.MPNetModel(
        transformers.MPNetConfig(
            vocab_size=96,
            hidden_size=32,
            num_hidden_layers=layers,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=64,
        )
    )


def _tiny_vit(**kw):
    import timm

    kw = dict(dict(img_size=16, patch_size=4, in_chans=1, num_classes=5, embed_dim=32, depth=4, num_heads=2), **kw)
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", **kw), kw


def _tiny_resnet():
    import timm

    kw = dict(num_classes=5, in_chans=1, layers=[1, 1, 1, 1], channels=(8, 16, 24, 32), stem_width=8)
    torch.manual_seed(0)
    return timm.create_model("resnet18", **kw), kw


# ----------------------------------------------------------------------------------------------- weights and loss
def test_depth_weights_and_total_equals_sum_of_alphas():
    assert exit_weights([4, 9, 18, 27, 36], 36) == pytest.approx([4 / 36, 9 / 36, 0.5, 0.75, 1.0])
    assert exit_weights([1, 2], 4, "uniform") == [1.0, 1.0]
    exits = {k: torch.randn(2, 5) for k in (4, 9, 18, 27, 36)}
    cfg = MultiExitConfig(self_distill_weight=0.0)
    res = multi_exit_loss(exits, 36, cfg, task_losses={k: torch.tensor(1.0) for k in exits})
    assert float(res.loss) == pytest.approx(sum(exit_weights(list(exits), 36)))  # 2.611...
    with pytest.raises(ValueError, match="3 weights given for 2 exits"):
        exit_weights([1, 2], 2, [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="'embedding' loss"):
        multi_exit_loss(exits, 36, MultiExitConfig(distill_loss="embedding_mse"), kind="logits")


def test_self_distillation_moves_only_shallow_exits():
    deep = torch.randn(4, 6, requires_grad=True)
    shallow = torch.randn(4, 6, requires_grad=True)
    res = multi_exit_loss({2: shallow, 4: deep}, 4, MultiExitConfig(), kind="logits")
    res.loss.backward()
    assert deep.grad is None and shallow.grad.abs().sum() > 0
    assert set(res.terms) == {"exit2_self_kd", "multi_exit_loss"}
    teacher = torch.randn(4, 6)
    res = multi_exit_loss({2: shallow, 4: deep}, 4, MultiExitConfig(), kind="logits", teacher=teacher)
    assert {"exit2_teacher_kd", "exit4_teacher_kd"} <= set(res.terms)


# --------------------------------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize(
    "layers, msg",
    [
        ([0, 2], "out of range"),
        ([2, 5], "out of range"),
        ([3, 2], "increasing"),
        ([2, 2], "increasing"),
        ([], "at least one"),
        ([1.5], "integers"),
        (2, "list of exit layers"),
    ],
)
def test_bad_exit_layers(layers, msg):
    with pytest.raises(ValueError, match=msg):
        add_exits(tiny_bert(layers=4), layers)


def test_unlocatable_family_names_what_was_tried():
    class FakeHF(nn.Module):
        base_model_prefix = "body"

        def __init__(self):
            super().__init__()
            self.config = object()
            self.body = nn.Sequential(nn.Linear(2, 2))

    with pytest.raises(ValueError, match=r"tried: encoder\.layer, model\.layers.*body\.encoder\.layer"):
        add_exits(FakeHF(), [1])
    with pytest.raises(ValueError, match="neither a Hugging Face model"):
        add_exits(nn.Sequential(nn.Linear(2, 2)), [1])


def test_truncate_needs_an_exit_and_other_bad_inputs():
    m = add_exits(tiny_bert(layers=4), [2, 4])
    with pytest.raises(ValueError, match=r"no exit at layer 3; this model's exits are at \[2, 4\]"):
        truncate(m, 3)
    with pytest.raises(ValueError, match="already has exits"):
        add_exits(m, [1])
    with pytest.raises(ValueError, match="has no exits"):
        truncate(tiny_bert(), 1)
    with pytest.raises(ValueError, match="head must be"):
        add_exits(tiny_bert(), [1], head="own")
    with pytest.raises(ValueError, match="exit_embedding=True is for causal LMs"):
        add_exits(tiny_bert(), [1], exit_embedding=True)
    r, _ = _tiny_resnet()
    with pytest.raises(ValueError, match="head='separate'"):
        add_exits(r, [2, 4], head="shared")
    remove_exits(m)
    assert not hasattr(m, "multi_exit")


# ------------------------------------------------------------------------------------------------- HF encoders
@pytest.mark.parametrize("factory", [lambda: tiny_bert(layers=4), _tiny_mpnet], ids=["bert", "mpnet"])
@pytest.mark.parametrize("head", ["shared", "separate", "ffn"])
def test_encoder_exits_and_truncation_parity(factory, head):
    model = factory().eval()
    inputs = _ids()
    ref = model(**inputs, output_hidden_states=True).hidden_states
    add_exits(model, [1, 3, 4], head=head)
    if head == "ffn":  # at init the feed-forward copy reproduces the block's own output
        torch.testing.assert_close(exit_outputs(model, **inputs)[1], ref[1])
    if head != "shared":
        _perturb(model.multi_exit)
    outs = exit_outputs(model, **inputs)
    assert list(outs) == [1, 3, 4]
    torch.testing.assert_close(outs[4], ref[4])
    if head == "shared":
        torch.testing.assert_close(outs[1], ref[1])
    for k in (1, 3, 4):
        small = truncate(model, k).eval()
        assert small.config.num_hidden_layers == k and not hasattr(small, "multi_exit")
        torch.testing.assert_close(small(**inputs).last_hidden_state, outs[k], rtol=1e-5, atol=1e-5)
    emb = exit_embeddings(model, normalize=True, **inputs)
    assert emb[1].shape == (3, 32) and torch.allclose(emb[1].norm(dim=-1), torch.ones(3))
    assert len(model.multi_exit.heads) == (0 if head == "shared" else 2)
    if head == "ffn":  # the heads are copies: the full model is untouched by perturbing them
        torch.testing.assert_close(model(**inputs).last_hidden_state, ref[4])
        res = early_exit_embed(model, inputs, threshold=-1.0)  # stops at the second exit (layer 3, an ffn head)
        torch.testing.assert_close(res.output, emb[3], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("head", ["shared", "separate"])
def test_convert_exit_heads_to_ffn_is_exact(head):
    from kd_plugins.multiexit import convert_exit_heads

    model = add_exits(tiny_bert(layers=4).eval(), [1, 3, 4], head=head)
    _perturb(model.multi_exit)
    inputs = _ids()
    ref = exit_outputs(model, **inputs)
    convert_exit_heads(model)
    assert model.multi_exit.head == "ffn" and sorted(model.multi_exit.heads) == ["1", "3"]
    outs = exit_outputs(model, **inputs)
    for k in ref:
        torch.testing.assert_close(outs[k], ref[k], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(truncate(model, 3).eval()(**inputs).last_hidden_state, ref[3], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="converts to head='ffn' only"):
        convert_exit_heads(model, "separate")
    clf = add_exits(tiny_bert("BertForSequenceClassification", layers=4), [2, 4], head="separate")
    with pytest.raises(ValueError, match="for bare HF encoders"):
        convert_exit_heads(clf)


def test_ffn_head_bad_inputs():
    with pytest.raises(ValueError, match="head='ffn' is for bare HF encoders"):
        add_exits(tiny_bert("BertForSequenceClassification", layers=4), [2, 4], head="ffn")
    model = tiny_bert(layers=4)
    del model.encoder.layer[1].intermediate
    with pytest.raises(ValueError, match="head='ffn' needs BERT-style blocks"):
        add_exits(model, [2, 4], head="ffn")
    model = add_exits(tiny_bert(layers=4), [2, 4], head="ffn")
    from kd_plugins.multiexit import apply_head

    with pytest.raises(ValueError, match="pass ffn_input"):
        apply_head(model, 2, torch.zeros(1, 3, 32))


def test_seq_classifier_truncation_and_early_exit():
    model = tiny_bert("BertForSequenceClassification", layers=4).eval()
    add_exits(model, [1, 2, 4], head="separate")
    _perturb(model.multi_exit)
    inputs = _ids(b=6)
    outs = exit_outputs(model, **inputs)
    torch.testing.assert_close(outs[4], model(**inputs).logits)
    for k in (1, 2):
        torch.testing.assert_close(truncate(model, k).eval()(**inputs).logits, outs[k], rtol=1e-5, atol=1e-5)
    res = early_exit_classify(model, inputs, threshold=0.0)  # everything confident at the first exit
    assert res.exit_layer.tolist() == [1] * 6 and res.average_depth == 1.0
    torch.testing.assert_close(res.output, outs[1], rtol=1e-5, atol=1e-5)
    res = early_exit_classify(model, inputs, threshold=1.0)
    assert res.exit_layer.tolist() == [4] * 6
    torch.testing.assert_close(res.output, outs[4], rtol=1e-5, atol=1e-5)
    conf = outs[1].detach().softmax(-1).max(-1).values
    t = float(conf.detach().median())
    res = early_exit_classify(model, inputs, threshold=t)  # mixed: samples leave the batch at different exits
    sim = simulate_early_exit(outs, torch.zeros(6, dtype=torch.long), [t])[0]
    expected = [1 if c >= t else None for c in conf.tolist()]
    assert [e for e, x in zip(res.exit_layer.tolist(), expected) if x] == [1] * sum(x is not None for x in expected)
    assert sim["average_depth"] == pytest.approx(res.average_depth)
    for b, k in enumerate(res.exit_layer.tolist()):
        torch.testing.assert_close(res.output[b], outs[k][b], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="criterion"):
        early_exit_classify(model, inputs, criterion="entropy?")


def test_early_exit_embed_returns_exit_ids():
    model = tiny_bert(layers=4).eval()
    add_exits(model, [1, 2, 4])
    inputs = _ids(b=4)
    full = exit_embeddings(model, normalize=True, **inputs)
    res = early_exit_embed(model, inputs, threshold=-1.0)  # any two exits "agree": stop at the second exit
    assert res.exit_layer.tolist() == [2] * 4
    torch.testing.assert_close(res.output, full[2], rtol=1e-5, atol=1e-5)
    res = early_exit_embed(model, inputs, threshold=1.0)
    assert set(res.exit_layer.tolist()) <= {2, 4}
    for b, k in enumerate(res.exit_layer.tolist()):
        torch.testing.assert_close(res.output[b], full[k][b], rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------------------- causal LM
def test_causal_lm_separate_norm_exit_embedding_truncation_and_generation():
    model = tiny_llama(layers=4).eval()
    add_exits(model, [1, 2, 4], head="separate", exit_embedding=True)
    _perturb(model.multi_exit)
    inputs = _ids(b=2, pad=False)
    outs = exit_outputs(model, **inputs)
    torch.testing.assert_close(outs[4], model(**inputs).logits)
    for k in (1, 2):
        small = truncate(model, k).eval()
        assert small.config.mlp_bias and small.config.num_hidden_layers == k
        torch.testing.assert_close(small(**inputs).logits, outs[k], rtol=1e-4, atol=1e-5)
    prompt = inputs["input_ids"][:1, :5]
    res = early_exit_generate(model, prompt, max_new_tokens=4, threshold=0.0)
    assert res.exit_layer.tolist() == [1] * 4 and res.output.shape == (4,)
    small1 = truncate(model, 1).eval()
    ref = small1.generate(prompt, max_new_tokens=4, do_sample=False, attention_mask=torch.ones_like(prompt))
    assert res.output.tolist() == ref[0, 5:].tolist()
    res = early_exit_generate(model, prompt, max_new_tokens=3, threshold=1.0)
    assert res.exit_layer.tolist() == [4] * 3 and res.average_depth == 4.0
    with pytest.raises(ValueError, match="early_exit_generate needs a causal LM"):
        early_exit_generate(add_exits(tiny_bert(), [1, 2]), prompt)


def test_hf_trainer_causal_lm_callback(tmp_out):
    from transformers import Trainer

    from kd_plugins import MultiExitCallback

    model = tiny_llama(layers=4)
    add_exits(model, [2, 4], head="separate")
    teacher = tiny_llama(layers=2, seed=3)
    before = {n: p.detach().clone() for n, p in model.multi_exit.named_parameters()}
    cb = MultiExitCallback(teacher, MultiExitConfig(temperature=2.0))
    logs = []

    class Keep(__import__("transformers").TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            logs_list.append(dict(logs or {}))

    logs_list = logs
    trainer = Trainer(
        model=model, args=training_args(tmp_out, max_steps=2), train_dataset=TokenDataset(n=8), callbacks=[cb, Keep()]
    )
    trainer.train()
    train_logs = [x for x in logs if "loss" in x]
    assert train_logs and {
        "exit2_task",
        "exit4_task",
        "exit2_self_kd",
        "exit2_teacher_kd",
        "exit4_teacher_kd",
        "multi_exit_loss",
    } <= set(train_logs[0])
    assert any(not torch.equal(before[n], p) for n, p in model.multi_exit.named_parameters())
    assert all(not p.requires_grad for p in teacher.parameters())


def test_hf_trainer_sequence_classifier_callback(tmp_out):
    from transformers import Trainer

    from kd_plugins import MultiExitCallback

    model = tiny_bert("BertForSequenceClassification", layers=4)
    add_exits(model, [1, 2, 4], head="separate")
    cb = MultiExitCallback(config=MultiExitConfig(weights=[0.2, 0.5, 1.0]))
    before = model.multi_exit.heads["1"]["classifier"].weight.detach().clone()
    trainer = Trainer(
        model=model,
        args=training_args(tmp_out, max_steps=2),
        train_dataset=TokenDataset(n=8, labels="seq"),
        callbacks=[cb],
    )
    trainer.train()
    assert not torch.equal(before, model.multi_exit.heads["1"]["classifier"].weight)
    assert cb.trainer is trainer and cb._counts["train"] == 0  # logged and reset


@pytest.mark.parametrize("head", ["separate", "ffn"])
def test_hf_trainer_encoder_infonce_with_teacher(tmp_out, head):
    from transformers import Trainer

    from kd_plugins import MultiExitCallback

    model = tiny_bert(layers=4)
    add_exits(model, [2, 4], head=head)
    teacher = tiny_bert(layers=4, seed=1)
    g = torch.Generator().manual_seed(0)

    class Pairs(torch.utils.data.Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            a, b = torch.randint(4, 96, (7,), generator=g), torch.randint(4, 96, (9,), generator=g)
            return {
                "input_ids": a,
                "attention_mask": torch.ones_like(a),
                "positive_input_ids": b,
                "positive_attention_mask": torch.ones_like(b),
            }

    cfg = MultiExitConfig(embedding_task="infonce", distill_loss="embedding_mse", teacher_weight=0.5)
    trainer = Trainer(
        model=model,
        args=training_args(tmp_out, max_steps=2, remove_unused_columns=False),
        train_dataset=Pairs(),
        callbacks=[MultiExitCallback(teacher, cfg)],
    )
    head_param = next(model.multi_exit.heads["2"].parameters())
    before = head_param.detach().clone()
    out = trainer.train()
    assert torch.isfinite(torch.tensor(out.training_loss))
    assert not torch.equal(before, head_param)


# -------------------------------------------------------------------------------------------------------- timm
def test_timm_vit_task_truncation_and_early_exit():
    from kd_plugins.integrations.timm import MultiExitTask

    model, kw = _tiny_vit()
    add_exits(model, [1, 2, 4], head="separate", create_kwargs=kw)
    x, y = torch.randn(6, 1, 16, 16), torch.randint(0, 5, (6,))
    teacher, _ = _tiny_vit(depth=1)
    task = MultiExitTask(model, config=MultiExitConfig(), teacher=teacher)
    res = task(x, y)
    res["loss"].backward()
    assert res["output"].shape == (6, 5) and "exit1_self_kd" in res and "exit4_teacher_kd" in res
    assert model.multi_exit.heads["1"]["head"].weight.grad is not None
    assert "_teacher" not in dict(task.named_modules()) and not any("teacher" in k for k in task.state_dict())
    model.eval()
    _perturb(model.multi_exit)
    outs = exit_outputs(model, x)
    torch.testing.assert_close(outs[4], model(x))
    for k in (1, 2):
        small = truncate(model, k).eval()
        assert len(small.blocks) == k
        torch.testing.assert_close(small(x), outs[k], rtol=1e-5, atol=1e-5)
    res = early_exit_classify(model, x, threshold=0.0)
    assert res.exit_layer.tolist() == [1] * 6
    t = float(outs[1].detach().softmax(-1).max(-1).values.median())
    res = early_exit_classify(model, x, threshold=t)
    sim = simulate_early_exit(outs, y, [t])[0]
    assert sim["average_depth"] == pytest.approx(res.average_depth)
    for b, k in enumerate(res.exit_layer.tolist()):
        torch.testing.assert_close(res.output[b], outs[k][b], rtol=1e-4, atol=1e-5)


def test_timm_resnet_exits_truncation_and_shared_vit():
    model, kw = _tiny_resnet()
    add_exits(model, [2, 3, 4], head="separate")
    model.eval()
    x = torch.randn(4, 1, 32, 32)
    outs = exit_outputs(model, x)
    torch.testing.assert_close(outs[4], model(x))
    for k in (2, 3):
        small = truncate(model, k, **kw).eval()
        assert small.kd_plugins_create_kwargs["layers"][k:] == [0] * (4 - k)
        torch.testing.assert_close(small(x), outs[k], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="does not match the source model"):
        truncate(model, 2)  # built with non-default kwargs that were not given
    vit, vkw = _tiny_vit()
    add_exits(vit, [2, 4], create_kwargs=vkw)  # shared head: norm + pool + head of the model itself
    vit.eval()
    xv = torch.randn(2, 1, 16, 16)
    torch.testing.assert_close(truncate(vit, 2).eval()(xv), exit_outputs(vit, xv)[2], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------- standalone load, plotting
def test_truncated_models_load_without_kd_plugins(tmp_path):
    bert = tiny_bert(layers=4).eval()
    add_exits(bert, [2, 4], head="separate")
    _perturb(bert.multi_exit)
    inputs = _ids()
    truncate(bert, 2).save_pretrained(tmp_path / "bert2")
    torch.save({"inputs": inputs, "hidden": exit_outputs(bert, **inputs)[2]}, tmp_path / "bert_ref.pt")
    vit, kw = _tiny_vit()
    add_exits(vit, [2, 4], head="separate", create_kwargs=kw)
    _perturb(vit.multi_exit)
    vit.eval()
    x = torch.randn(2, 1, 16, 16)
    small = truncate(vit, 2)
    torch.save(small.state_dict(), tmp_path / "vit2.pt")
    (tmp_path / "vit2.json").write_text(
        json.dumps({"arch": small.pretrained_cfg["architecture"], "kwargs": small.kd_plugins_create_kwargs})
    )
    torch.save({"x": x, "logits": exit_outputs(vit, x)[2]}, tmp_path / "vit_ref.pt")
    code = textwrap.dedent(f"""
        import json, sys, torch
        sys.modules["kd_plugins"] = None  # any import of kd_plugins now fails
        import timm
        from transformers import AutoModel
        d = {str(tmp_path)!r}
        ref = torch.load(d + "/bert_ref.pt")
        m = AutoModel.from_pretrained(d + "/bert2").eval()
        assert m.config.num_hidden_layers == 2
        torch.testing.assert_close(m(**ref["inputs"]).last_hidden_state, ref["hidden"], rtol=1e-5, atol=1e-5)
        spec = json.load(open(d + "/vit2.json"))
        v = timm.create_model(spec["arch"], **spec["kwargs"]).eval()
        v.load_state_dict(torch.load(d + "/vit2.pt"))
        ref = torch.load(d + "/vit_ref.pt")
        torch.testing.assert_close(v(ref["x"]), ref["logits"], rtol=1e-5, atol=1e-5)
        print("OK")
    """)
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH="")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-2000:]


def test_plot_accuracy_vs_depth(tmp_path):
    pytest.importorskip("matplotlib")
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (50,), generator=g)
    logits = {k: torch.randn(50, 3, generator=g) * k for k in (1, 2, 4)}
    curve = simulate_early_exit(logits, labels, [0.0, 0.5, 0.9, 1.0])
    assert curve[0]["average_depth"] == 1.0 and curve[-1]["average_depth"] == 4.0
    assert curve[-1]["exit_share"] == {1: 0.0, 2: 0.0, 4: 1.0}
    depths = [p["average_depth"] for p in curve]
    assert depths == sorted(depths)
    path = plot_accuracy_vs_depth(
        {"toy": curve}, tmp_path / "curve.png", num_layers=4, per_exit={"toy": {k: 0.5 for k in logits}}
    )
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError):
        get_exits(nn.Linear(2, 2))


def test_plot_accuracy_vs_depth_leaves_the_global_backend_alone(tmp_path):
    """Switching matplotlib's backend would break inline plots in a notebook."""
    matplotlib = pytest.importorskip("matplotlib")
    before = matplotlib.get_backend()
    matplotlib.use("template")  # a backend other than the Agg the helper draws with
    try:
        curve = [{"average_depth": 1.0, "accuracy": 0.5}, {"average_depth": 2.0, "accuracy": 0.7}]
        plot_accuracy_vs_depth({"toy": curve}, tmp_path / "curve.png")
        assert matplotlib.get_backend() == "template"
    finally:
        matplotlib.use(before)


# ------------------------------------------------------------- the MiniLM benchmark's final phase through the callback
def _texts(b, t, seed, pad_rows=(1,)):
    batch = _ids(b=b, t=t, seed=seed, pad=False)
    for i in pad_rows:  # padding, so pooling must use each group's own attention mask
        batch["input_ids"][i, -2:] = 0
        batch["attention_mask"][i, -2:] = 0
    return batch


def _loop_objective(model, teacher_emb, groups, cfg, autocast):
    """The benchmark loop's formula (multiexit_minilm_bbc.py before it moved to the Trainer), public functions only:
    InfoNCE(title, body) + w * InfoNCE(ict query, ict doc) per exit, and both title and body embeddings distilled."""
    from kd_plugins.multiexit import info_nce, pool

    q, d, iq, idoc = groups
    for_student = dict(device_type="cpu", dtype=torch.bfloat16, enabled=autocast)  # the student's forwards only
    with torch.autocast(**for_student):
        oq, od = exit_outputs(model, **q), exit_outputs(model, **d)
    with torch.autocast(**for_student):
        oiq, oid = exit_outputs(model, **iq), exit_outputs(model, **idoc)
    eq = {k: pool(h.float(), q["attention_mask"]) for k, h in oq.items()}
    ed = {k: pool(h.float(), d["attention_mask"]) for k, h in od.items()}
    task = {k: info_nce(eq[k], ed[k], cfg.infonce_scale) for k in eq}
    for k in task:
        ict = info_nce(
            pool(oiq[k].float(), iq["attention_mask"]), pool(oid[k].float(), idoc["attention_mask"]), cfg.infonce_scale
        )
        task[k] = task[k] + cfg.extra_pairs_weight * ict
    both = {k: torch.cat([eq[k], ed[k]]) for k in eq}
    return multi_exit_loss(
        both, get_exits(model).num_layers, cfg, kind="embedding", task_losses=task, teacher=teacher_emb
    )


@pytest.mark.parametrize(
    "head,heads_only,precomputed,bf16",
    [
        ("ffn", True, True, False),  # the benchmark's phase N: heads only, cached teacher embeddings
        ("ffn", True, True, True),  # ... with --bf16 (Trainer(bf16=True) autocast, losses in fp32)
        ("separate", False, False, False),  # everything trains, teacher model run by the callback
    ],
)
def test_callback_step_equals_benchmark_loop_objective(tmp_out, head, heads_only, precomputed, bf16):
    from transformers import Trainer, TrainerCallback

    from kd_plugins import MultiExitCallback
    from kd_plugins.multiexit import pool

    no_dropout = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = tiny_bert(layers=4, **no_dropout)
    add_exits(model, [1, 2, 4], head=head)
    _perturb(model.multi_exit, seed=3, scale=0.05)
    if heads_only:
        for name, prm in model.named_parameters():
            prm.requires_grad_(name.startswith("multi_exit."))
    teacher = tiny_bert(layers=4, seed=1, **no_dropout).eval()
    groups = (_texts(4, 7, 1), _texts(4, 11, 2, (0, 2)), _texts(3, 6, 3), _texts(3, 10, 4, (2,)))
    with torch.no_grad():
        t_q, t_d = (pool(teacher(**x).last_hidden_state, x["attention_mask"]) for x in groups[:2])
    cfg = MultiExitConfig(
        weights=[0.333, 0.5, 3],
        task_weight=1.0,
        self_distill_weight=0.5,
        teacher_weight=1.0,
        distill_loss="embedding_mse",
        embedding_task="infonce",
        infonce_scale=20.0,
        distill_positives=True,
        extra_pairs_weight=0.7,
        embedding_losses_fp32=True,
    )
    batch = {}
    for prefix, group in zip(("", "positive_", "extra_", "extra_positive_"), groups):
        batch.update({prefix + k: v for k, v in group.items()})
    if precomputed:
        batch.update(teacher_embedding=t_q, positive_teacher_embedding=t_d)
    cb = MultiExitCallback(None if precomputed else teacher, cfg)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    seen = {}

    class Capture(TrainerCallback):  # one Trainer step: its gradients and loss terms, before the optimizer moves
        def on_pre_optimizer_step(self, args, state, control, **kw):
            seen["grads"] = {n: None if p.grad is None else p.grad.clone() for n, p in trainable}
            seen["terms"] = {k: v / cb._counts["train"] for k, v in cb._sums["train"].items()}

    args = training_args(
        tmp_out, max_steps=1, per_device_train_batch_size=1, remove_unused_columns=False, bf16=bf16, max_grad_norm=0.0
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=[batch],
        data_collator=lambda rows: dict(rows[0]),
        optimizers=(torch.optim.SGD([p for _, p in trainable], lr=0.0), None),
        callbacks=[cb, Capture()],
    )
    step_loss = trainer.train().training_loss
    model.zero_grad(set_to_none=True)

    ref = _loop_objective(model, torch.cat([t_q, t_d]), groups, cfg, autocast=bf16)
    ref.loss.backward()
    assert step_loss == float(ref.loss.detach())
    for n, p in trainable:  # (the pooler gets no gradient in either)
        assert (p.grad is None and seen["grads"][n] is None) or torch.equal(seen["grads"][n], p.grad), n
    terms = seen["terms"]
    assert all(terms[k] == v for k, v in ref.terms.items())
    assert set(terms) - set(ref.terms) == {"exit1_extra_infonce", "exit2_extra_infonce", "exit4_extra_infonce"}
    if heads_only:  # the deepest exit has no trainable weight: no gradient check error, and only heads move
        assert all(n.startswith("multi_exit.") for n, _ in trainable)


def test_callback_pair_groups_and_teacher_embeddings_errors(tmp_out):
    from transformers import Trainer

    from kd_plugins import MultiExitCallback

    model = tiny_bert(layers=2)
    add_exits(model, [1, 2], head="separate")
    q, d = _texts(3, 6, 1), _texts(3, 8, 2)
    pairs = {**q, **{"positive_" + k: v for k, v in d.items()}}

    def loss_of(batch, teacher=None, **cfg):
        cb = MultiExitCallback(teacher, MultiExitConfig(**cfg))
        trainer = Trainer(model=model, args=training_args(tmp_out, remove_unused_columns=False), callbacks=[cb])
        return trainer.compute_loss(model, batch)

    with pytest.raises(ValueError, match="extra_pairs_weight > 0 needs extra_input_ids"):
        loss_of(pairs, embedding_task="infonce", extra_pairs_weight=1.0)
    with pytest.raises(ValueError, match="distill_positives=True needs positive_input_ids"):
        loss_of(q, distill_positives=True)
    with pytest.raises(ValueError, match="embedding_task='infonce' needs positive_input_ids"):
        loss_of(q, embedding_task="infonce")
    emb = torch.randn(3, 32)
    with pytest.raises(ValueError, match=r"not \['positive_teacher_embedding'\]"):
        loss_of({**pairs, "teacher_embedding": emb}, distill_positives=True)
    with pytest.raises(ValueError, match="give one source of teacher embeddings"):
        loss_of({**q, "teacher_embedding": emb}, teacher=tiny_bert(layers=2, seed=1))
    with pytest.raises(ValueError, match="needs embedding_task='infonce' and task_weight > 0"):
        MultiExitConfig(extra_pairs_weight=1.0)
    with pytest.raises(ValueError, match="needs embedding_task='infonce' and task_weight > 0"):
        MultiExitConfig(embedding_task="infonce", task_weight=0.0, extra_pairs_weight=1.0)
    with pytest.raises(ValueError, match="apply to encoder exits"):
        clf = add_exits(tiny_bert("BertForSequenceClassification", layers=2), [1, 2], head="separate")
        Trainer(model=clf, args=training_args(tmp_out), callbacks=[MultiExitCallback(distill_positives=True)])
    # defaults: the extra groups and the teacher embedding key are not model inputs, and change nothing
    base = loss_of(pairs, embedding_task="infonce")
    extra = {"extra_" + k: v for k, v in _texts(3, 5, 5).items()}
    assert torch.equal(loss_of({**pairs, **extra}, embedding_task="infonce"), base)
