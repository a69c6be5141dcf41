"""Fused linear + distillation loss (kd_plugins.kernels): loss and gradient parity with the reference loss library.

Reference path: ``logits = hidden @ W.T (+ b)`` (in the input dtype), then the ``kd_plugins.losses`` function
(``kl_divergence``, ``reverse_kl_divergence``, ``generalized_jsd``, ``total_variation_distance``) plus
``hard_label_weight * CE`` summed over the same rows and divided by the same normaliser; gradients by autograd.

Tolerance table (``err = max|fused - ref| / max(max|ref|, 1e-6)`` per tensor; loss/parts compared the same way):

=====================  ===========  ===========  ===========================================================
path                   dtype        loss / parts  grads (hidden, head weight, head bias)
=====================  ===========  ===========  ===========================================================
torch chunked          float64      1e-10        1e-10   (same math, float64 end to end)
torch chunked          float32      2e-5         2e-5    (chunked matmuls vs one big matmul, float32 sums)
torch chunked          bfloat16     2e-2         4e-2    (bf16 logits/grad matmuls; per-chunk bf16 rounding of grad_W)
triton (interpreter)   float32      2e-5         2e-5    (fp32 tiles, online log-sum-exp, atomics)
triton (interpreter)   bfloat16     2e-2         4e-2    (fp32 logit tiles vs the reference's bf16-rounded logits)
=====================  ===========  ===========  ===========================================================

The Triton kernels run here under ``TRITON_INTERPRET=1`` in a subprocess (the variable must be set before triton is
imported, and other test modules may import triton); on a CUDA machine they also run natively
(``test_triton_cuda_parity``) and ``benchmarks/gpu_check.py`` times them.
"""

from __future__ import annotations

import os

_INNER = os.environ.get("KD_FUSED_KD_TRITON_INNER") == "1"
if _INNER:  # inner run (subprocess): the Triton interpreter must be configured before triton is imported
    os.environ["TRITON_INTERPRET"] = "1"

import subprocess  # noqa: E402
import sys  # noqa: E402
import types  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from kd_plugins import losses as L  # noqa: E402
from kd_plugins.kernels import (  # noqa: E402
    FusedLinearKDLoss,
    UnfusableHeadError,
    check_fusable_head,
    fused_kd_loss_from_heads,
    fused_linear_kd_loss,
    interpreter_enabled,
    triton_available,
)

TOL = {
    ("torch", torch.float64): (1e-10, 1e-10),
    ("torch", torch.float32): (2e-5, 2e-5),
    ("torch", torch.bfloat16): (2e-2, 4e-2),
    ("triton", torch.float32): (2e-5, 2e-5),
    ("triton", torch.bfloat16): (2e-2, 4e-2),
}
REF = {
    "kl": L.kl_divergence,
    "reverse_kl": L.reverse_kl_divergence,
    "jsd": L.generalized_jsd,
    "tvd": L.total_variation_distance,
}
DIVS = ("kl", "reverse_kl", "jsd", "tvd")

inner_only = pytest.mark.skipif(not _INNER, reason="runs inside the TRITON_INTERPRET=1 subprocess")
outer_only = pytest.mark.skipif(_INNER, reason="outer process only")


# ----------------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------------


def make_case(
    n=29,
    h=24,
    ht=40,
    v=61,
    dtype=torch.float32,
    bias=False,
    teacher="hidden",
    ignore_every=4,
    temperature=1.0,
    k=6,
    seed=0,
):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    c = types.SimpleNamespace(
        xs=rnd(n, h),
        w=rnd(v, h, scale=h**-0.5 * 3),
        b=rnd(v) if bias else None,
        xt=rnd(n, ht),
        wt=rnd(v, ht, scale=ht**-0.5 * 3),
        bt=rnd(v) if bias else None,
        labels=torch.randint(0, v, (n,), generator=g),
        teacher=teacher,
        v=v,
    )
    if ignore_every:
        c.labels[::ignore_every] = -100
    t_logits = c.xt.float() @ c.wt.float().T + (c.bt.float() if bias else 0)
    c.t_logits = t_logits
    lp, idx = torch.log_softmax(t_logits / temperature, -1).topk(k, -1)
    c.topk = (idx, lp)
    return c


def teacher_kwargs(c):
    if c.teacher == "hidden":
        return dict(teacher_hidden=c.xt, teacher_head_weight=c.wt, teacher_head_bias=c.bt)
    if c.teacher == "logits":
        return dict(teacher_logits=c.t_logits)
    return dict(teacher_topk=c.topk)


def reference(
    c,
    xs,
    w,
    b,
    *,
    divergence="kl",
    beta=0.5,
    temperature=1.0,
    hard_label_weight=0.0,
    kd_weight=1.0,
    num_items_in_batch=None,
    mask=None,
    topk_tail="bucket",
):
    z = xs @ w.T
    if b is not None:
        z = z + b
    kw = dict(labels=c.labels, mask=mask, temperature=temperature, num_items_in_batch=num_items_in_batch)
    if divergence == "jsd":
        kw["beta"] = beta
    if c.teacher == "topk":
        kd = REF[divergence](z, None, teacher_topk=c.topk, topk_tail=topk_tail, **kw)
    else:
        if c.teacher == "hidden":
            zt = c.xt @ c.wt.T
            if c.bt is not None:
                zt = zt + c.bt
        else:
            zt = c.t_logits
        kd = REF[divergence](z, zt, **kw)
    valid = c.labels != -100
    if mask is not None:
        valid = valid & mask
    denom = num_items_in_batch if num_items_in_batch is not None else max(int(valid.sum()), 1)
    cdt = torch.float64 if z.dtype == torch.float64 else torch.float32
    ce_rows = F.cross_entropy(z.to(cdt), c.labels.clamp(min=0), reduction="none")
    ce = (ce_rows * valid).sum() / denom
    return kd_weight * kd + hard_label_weight * ce, kd, ce


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / max(float(b.abs().max()), 1e-6))


def run_both(c, backend="torch", chunk_size=7, **kw):
    """(fused loss, parts, grads) and (reference loss, kd, ce, grads)."""
    leaves = [c.xs.clone().requires_grad_(), c.w.clone().requires_grad_()]
    if c.b is not None:
        leaves.append(c.b.clone().requires_grad_())
    loss, parts = fused_linear_kd_loss(
        leaves[0],
        leaves[1],
        student_head_bias=leaves[2] if c.b is not None else None,
        labels=c.labels,
        chunk_size=chunk_size,
        backend=backend,
        return_parts=True,
        **teacher_kwargs(c),
        **kw,
    )
    loss.backward()
    got = (loss, parts, [t.grad for t in leaves])
    rl = [c.xs.clone().requires_grad_(), c.w.clone().requires_grad_()]
    if c.b is not None:
        rl.append(c.b.clone().requires_grad_())
    ref_kw = {k: v for k, v in kw.items() if k != "t2_scale"}
    rloss, kd, ce = reference(c, rl[0], rl[1], rl[2] if c.b is not None else None, **ref_kw)
    rloss.backward()
    return got, (rloss, kd, ce, [t.grad for t in rl])


def assert_parity(got, want, tol):
    (loss, parts, grads), (rloss, kd, ce, rgrads) = got, want
    tl, tg = tol
    assert rel(loss, rloss) <= tl, (float(loss.detach()), float(rloss.detach()))
    assert rel(parts["kd"], kd) <= tl, (float(parts["kd"]), float(kd.detach()))
    if "ce" in parts:
        assert rel(parts["ce"], ce) <= tl, (float(parts["ce"]), float(ce.detach()))
    for name, g, r in zip(("hidden", "weight", "bias"), grads, rgrads):
        assert g is not None and g.dtype == r.dtype and g.shape == r.shape, name
        assert rel(g, r) <= tg, (name, rel(g, r))


# ----------------------------------------------------------------------------------------------------------------------
# chunked PyTorch path: parity
# ----------------------------------------------------------------------------------------------------------------------


@outer_only
@pytest.mark.parametrize("divergence", DIVS)
@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("teacher", ["hidden", "logits"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_parity_dense(divergence, temperature, teacher, dtype):
    c = make_case(dtype=dtype, teacher=teacher, bias=teacher == "hidden")
    got, want = run_both(c, divergence=divergence, temperature=temperature, beta=0.3, hard_label_weight=0.4)
    assert_parity(got, want, TOL[("torch", dtype)])


@outer_only
@pytest.mark.parametrize("divergence", DIVS)
@pytest.mark.parametrize("topk_tail", ["bucket", "renormalize"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_torch_parity_topk(divergence, topk_tail, temperature):
    c = make_case(teacher="topk", temperature=temperature, bias=True)
    got, want = run_both(c, divergence=divergence, temperature=temperature, topk_tail=topk_tail, hard_label_weight=0.5)
    assert_parity(got, want, TOL[("torch", torch.float32)])


@outer_only
@pytest.mark.parametrize("teacher", ["hidden", "logits", "topk"])
def test_torch_agreement_part_counts_top1_matches_of_the_valid_rows(teacher):
    c = make_case(teacher=teacher, bias=True, n=40)
    t_logits = c.xt @ c.wt.T + c.bt if teacher == "hidden" else c.t_logits
    t_top = c.topk[0][:, 0] if teacher == "topk" else t_logits.argmax(-1)
    c.xs[:20] = 10 * c.w[t_top[:20]]  # steer the first 20 student rows to the teacher's top-1 token
    mask = torch.ones(40, dtype=torch.bool)
    mask[5:9] = False
    kw = dict(student_head_bias=c.b, labels=c.labels, mask=mask, chunk_size=7, return_parts=True, **teacher_kwargs(c))
    _, parts = fused_linear_kd_loss(c.xs, c.w, agreement=True, **kw)
    s_top = (c.xs @ c.w.T + c.b).argmax(-1)
    valid = (c.labels != -100) & mask
    matches = (s_top == t_top)[valid]
    assert 0 < int(matches.sum()) < int(valid.sum())  # the case has rows on both sides
    assert float(parts["agreement"]) == pytest.approx(float(matches.float().mean()), abs=1e-7)
    # not asked for, or no teacher term: no agreement (and no argmax work)
    assert "agreement" not in fused_linear_kd_loss(c.xs, c.w, **kw)[1]
    _, ce_only = fused_linear_kd_loss(
        c.xs, c.w, labels=c.labels, kd_weight=0.0, hard_label_weight=1.0, return_parts=True, agreement=True
    )
    assert "agreement" not in ce_only


@outer_only
@pytest.mark.parametrize("divergence", DIVS)
def test_torch_parity_float64_exact(divergence):
    c = make_case(dtype=torch.float64, bias=True)
    got, want = run_both(
        c, divergence=divergence, temperature=1.7, beta=0.6, hard_label_weight=0.3, num_items_in_batch=50
    )
    assert_parity(got, want, TOL[("torch", torch.float64)])


@outer_only
@pytest.mark.parametrize("num_items_in_batch", [None, 64, torch.tensor(64)])
@pytest.mark.parametrize("use_mask", [False, True])
def test_torch_masks_and_num_items(num_items_in_batch, use_mask):
    c = make_case(ignore_every=3)
    mask = (torch.arange(29) % 5 != 1) if use_mask else None
    got, want = run_both(
        c,
        divergence="jsd",
        temperature=2.0,
        hard_label_weight=0.7,
        kd_weight=0.5,
        num_items_in_batch=num_items_in_batch,
        mask=mask,
    )
    assert_parity(got, want, TOL[("torch", torch.float32)])
    # ignored / masked rows get exactly zero gradient
    dead = c.labels == -100
    if mask is not None:
        dead |= ~mask
    assert torch.all(got[2][0][dead] == 0)


@outer_only
@pytest.mark.parametrize("beta,equiv", [(0.0, "kl"), (1.0, "reverse_kl")])
def test_jsd_beta_edges_follow_reference(beta, equiv):
    c = make_case()
    got, want = run_both(c, divergence="jsd", beta=beta, temperature=2.0)
    assert_parity(got, want, TOL[("torch", torch.float32)])
    other, _ = run_both(c, divergence=equiv, temperature=2.0)
    assert rel(got[0], other[0]) < 1e-6


@outer_only
def test_chunk_size_invariance_and_hard_label_only():
    c = make_case(bias=True)
    losses = []
    for cs in (1, 5, 29, 4096):
        (loss, _, grads), _ = run_both(c, chunk_size=cs, divergence="reverse_kl", hard_label_weight=1.0)
        losses.append((loss, grads))
    for loss, grads in losses[1:]:
        assert rel(loss, losses[0][0]) < 1e-6
        for g, g0 in zip(grads, losses[0][1]):
            assert rel(g, g0) < 1e-5
    # kd_weight=0 and no teacher: a fused hard-label cross-entropy
    xs = c.xs.clone().requires_grad_()
    loss = fused_linear_kd_loss(
        xs, c.w, student_head_bias=c.b, labels=c.labels, kd_weight=0.0, hard_label_weight=1.0, chunk_size=4
    )
    loss.backward()
    xr = c.xs.clone().requires_grad_()
    ref = F.cross_entropy(xr @ c.w.T + c.b, c.labels, ignore_index=-100)
    ref.backward()
    assert rel(loss, ref) < 1e-5 and rel(xs.grad, xr.grad) < 1e-5


@outer_only
def test_all_rows_ignored_gives_zero():
    c = make_case()
    c.labels[:] = -100
    got, want = run_both(c, divergence="kl", hard_label_weight=1.0)
    assert float(got[0].detach()) == 0.0 == float(want[0].detach())
    assert all(torch.all(g == 0) for g in got[2])


@outer_only
def test_grad_output_scaling_frozen_head_and_no_grad():
    c = make_case()
    xs = c.xs.clone().requires_grad_()
    w = c.w.clone().requires_grad_()
    kw = dict(teacher_hidden=c.xt, teacher_head_weight=c.wt, labels=c.labels, divergence="tvd", chunk_size=8)
    (3.0 * fused_linear_kd_loss(xs, w, **kw) + xs.sum()).backward()
    xr, wr = c.xs.clone().requires_grad_(), c.w.clone().requires_grad_()
    c.teacher = "hidden"
    (3.0 * reference(c, xr, wr, None, divergence="tvd")[0] + xr.sum()).backward()
    assert rel(xs.grad, xr.grad) < 2e-5 and rel(w.grad, wr.grad) < 2e-5
    # frozen head (weight without grad): only the hidden gradient
    xs2 = c.xs.clone().requires_grad_()
    fused_linear_kd_loss(xs2, c.w, **kw).backward()
    assert xs2.grad is not None
    with torch.no_grad():
        l_ng = fused_linear_kd_loss(c.xs, c.w, **kw)
    assert not l_ng.requires_grad and rel(l_ng, reference(c, c.xs, c.w, None, divergence="tvd")[0]) < 2e-5


@outer_only
def test_module_form_and_aliases():
    c = make_case(bias=True)
    crit = FusedLinearKDLoss("gkd", beta=0.4, temperature=1.5, hard_label_weight=0.2, chunk_size=6)
    assert "gkd" in repr(crit)
    xs = c.xs.clone().requires_grad_()
    loss, parts = crit(
        xs, c.w, c.xt, c.wt, labels=c.labels, student_head_bias=c.b, teacher_head_bias=c.bt, return_parts=True
    )
    c.teacher = "hidden"
    ref, kd, ce = reference(c, c.xs, c.w, c.b, divergence="jsd", beta=0.4, temperature=1.5, hard_label_weight=0.2)
    assert rel(loss, ref) < 2e-5 and rel(parts["kd"], kd) < 2e-5 and rel(parts["ce"], ce) < 2e-5


class _MaxAllocMode(TorchDispatchMode):
    """Records the largest tensor produced by any aten op."""

    def __init__(self):
        super().__init__()
        self.max_numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.max_numel = max(self.max_numel, t.numel())
        return out


@outer_only
@pytest.mark.parametrize("teacher", ["hidden", "topk"])
def test_never_materialises_full_logits(teacher):
    n, v, cs = 256, 500, 32
    c = make_case(n=n, v=v, h=16, ht=16, teacher=teacher, ignore_every=0)
    xs, w = c.xs.clone().requires_grad_(), c.w.clone().requires_grad_()
    with _MaxAllocMode() as mode:
        loss = fused_linear_kd_loss(
            xs, w, labels=c.labels, chunk_size=cs, divergence="jsd", hard_label_weight=0.5, **teacher_kwargs(c)
        )
        loss.backward()
    assert mode.max_numel <= cs * v, (mode.max_numel, n * v)
    with _MaxAllocMode() as naive:
        reference(c, c.xs, c.w.clone().requires_grad_(), None, divergence="jsd")[0].backward()
    assert naive.max_numel >= n * v


# ----------------------------------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------------------------------


@outer_only
def test_bad_inputs():
    c = make_case()
    ok = dict(teacher_hidden=c.xt, teacher_head_weight=c.wt, labels=c.labels)
    with pytest.raises(ValueError, match="teacher_hidden has shape"):
        fused_linear_kd_loss(c.xs, c.w, c.xt[:-1], c.wt, labels=c.labels)
    with pytest.raises(ValueError, match="teacher_head_weight has shape"):
        fused_linear_kd_loss(c.xs, c.w, c.xt, c.wt[:, :-1], labels=c.labels)
    with pytest.raises(ValueError, match="teacher vocabulary"):
        fused_linear_kd_loss(c.xs, c.w, c.xt, c.wt[:-1], labels=c.labels)
    with pytest.raises(ValueError, match="student_head_weight has shape"):
        fused_linear_kd_loss(c.xs, c.w[:, :-1], **ok)
    with pytest.raises(ValueError, match="teacher_logits has shape"):
        fused_linear_kd_loss(c.xs, c.w, teacher_logits=c.t_logits[:, :-1], labels=c.labels)
    with pytest.raises(ValueError, match="labels has shape"):
        fused_linear_kd_loss(c.xs, c.w, c.xt, c.wt, labels=c.labels[:-1])
    with pytest.raises(ValueError, match="student_hidden must be a 2-D"):
        fused_linear_kd_loss(c.xs[None], c.w, c.xt, c.wt)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="chunk_size must be a positive int"):
            fused_linear_kd_loss(c.xs, c.w, chunk_size=bad, **ok)
    with pytest.raises(ValueError, match="chunk_size"):
        FusedLinearKDLoss(chunk_size=0)
    idx, lp = c.topk
    with pytest.raises(ValueError, match=r"teacher_topk indices must lie in \[0, 61\)"):
        fused_linear_kd_loss(c.xs, c.w, teacher_topk=(idx + 61, lp), labels=c.labels)
    with pytest.raises(ValueError, match="teacher_topk has rows"):
        fused_linear_kd_loss(c.xs, c.w, teacher_topk=(idx[:-1], lp[:-1]), labels=c.labels)
    with pytest.raises(ValueError, match="divergence must be one of"):
        fused_linear_kd_loss(c.xs, c.w, divergence="dkd", **ok)
    with pytest.raises(ValueError, match="temperature"):
        fused_linear_kd_loss(c.xs, c.w, temperature=0.0, **ok)
    with pytest.raises(ValueError, match="exactly one teacher"):
        fused_linear_kd_loss(c.xs, c.w, c.xt, c.wt, teacher_logits=c.t_logits)
    with pytest.raises(ValueError, match="no teacher signal"):
        fused_linear_kd_loss(c.xs, c.w, labels=c.labels)
    with pytest.raises(ValueError, match="needs labels"):
        fused_linear_kd_loss(c.xs, c.w, c.xt, c.wt, hard_label_weight=1.0)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 61\)"):
        fused_linear_kd_loss(c.xs, c.w, c.xt, c.wt, labels=c.labels + 100, hard_label_weight=1.0)
    with pytest.raises(ValueError, match="share a dtype"):
        fused_linear_kd_loss(c.xs.double(), c.w, **ok)


@outer_only
@pytest.mark.skipif(
    torch.cuda.is_available() or interpreter_enabled(), reason="checks the CPU-without-interpreter error"
)
def test_triton_backend_without_gpu_is_a_clear_error():
    c = make_case()
    with pytest.raises(RuntimeError, match="CUDA tensors|triton"):
        fused_linear_kd_loss(c.xs, c.w, c.xt, c.wt, labels=c.labels, backend="triton")
    # "auto" falls back to the chunked PyTorch path on CPU
    assert torch.isfinite(fused_linear_kd_loss(c.xs, c.w, c.xt, c.wt, labels=c.labels, backend="auto"))


# ----------------------------------------------------------------------------------------------------------------------
# head checks and the integration entry point
# ----------------------------------------------------------------------------------------------------------------------


class _FakeLM(nn.Module):
    def __init__(self, head, **config):
        super().__init__()
        self.head = head
        self.config = types.SimpleNamespace(**config)

    def get_output_embeddings(self):
        return self.head


class _CustomHead(nn.Linear):
    def forward(self, x):
        return super().forward(x) * 2


class _WrappedHead(nn.Module):  # e.g. a LoRA wrapper: not an nn.Linear
    def __init__(self):
        super().__init__()
        self.base_layer = nn.Linear(4, 8)

    def forward(self, x):
        return self.base_layer(x)


@outer_only
def test_check_fusable_head():
    head = nn.Linear(4, 8, bias=False)
    assert check_fusable_head(_FakeLM(head, final_logit_softcapping=None, logit_scale=1.0)) is head
    assert check_fusable_head(head) is head
    for cfg, msg in (
        ({"final_logit_softcapping": 30.0}, "soft-capping"),
        ({"logit_scale": 0.0625}, "logit_scale"),
        ({"logits_scaling": 8.0}, "logits_scaling"),
        ({"model_type": "t5", "tie_word_embeddings": True}, "d_model"),
    ):
        with pytest.raises(UnfusableHeadError, match=msg):
            check_fusable_head(_FakeLM(head, **cfg))
    with pytest.raises(UnfusableHeadError, match="not a plain nn.Linear"):
        check_fusable_head(_FakeLM(_CustomHead(4, 8)))
    with pytest.raises(UnfusableHeadError, match="not a plain nn.Linear"):
        check_fusable_head(_FakeLM(_WrappedHead()))
    with pytest.raises(UnfusableHeadError, match="no output head"):
        check_fusable_head(_FakeLM(None))
    hooked = nn.Linear(4, 8)
    hooked.register_forward_hook(lambda m, i, o: o * 2)
    with pytest.raises(UnfusableHeadError, match="hooks"):
        check_fusable_head(hooked)
    with torch.device("meta"):
        meta = nn.Linear(4, 8)
    with pytest.raises(UnfusableHeadError, match="meta"):
        check_fusable_head(meta)


@outer_only
def test_real_hf_heads_and_entry_point():
    transformers = pytest.importorskip("transformers")
    gemma = transformers.Gemma2ForCausalLM(
        transformers.Gemma2Config(
            vocab_size=64,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=8,
        )
    )
    with pytest.raises(UnfusableHeadError, match="final_logit_softcapping"):
        check_fusable_head(gemma)
    torch.manual_seed(0)

    def llama(hidden):
        return transformers.LlamaForCausalLM(
            transformers.LlamaConfig(
                vocab_size=64,
                hidden_size=hidden,
                intermediate_size=32,
                num_hidden_layers=1,
                num_attention_heads=2,
                num_key_value_heads=1,
                tie_word_embeddings=hidden == 16,
            )
        ).eval()

    student, teacher = llama(16), llama(24)
    check_fusable_head(student)
    check_fusable_head(teacher)
    ids = torch.randint(0, 64, (2, 9))
    labels = ids.clone()
    labels[0, :3] = -100
    s_out = student(ids, output_hidden_states=True)
    with torch.no_grad():
        t_out = teacher(ids, output_hidden_states=True)
    hs = s_out.hidden_states[-1][:, :-1].reshape(-1, 16)
    ht = t_out.hidden_states[-1][:, :-1].reshape(-1, 24)
    y = labels[:, 1:].reshape(-1)
    cfg = {"divergence": "reverse_kl", "temperature": 2.0, "hard_label_weight": 0.5, "chunk_size": 5}
    loss = fused_kd_loss_from_heads(hs, student.lm_head, ht, teacher.lm_head, y, cfg)
    (g_fused,) = torch.autograd.grad(loss, student.lm_head.weight, retain_graph=True)
    s_logits = s_out.logits[:, :-1].reshape(-1, 64)
    ref = L.reverse_kl_divergence(
        s_logits, t_out.logits[:, :-1].reshape(-1, 64), labels=y, temperature=2.0
    ) + 0.5 * F.cross_entropy(s_logits, y, ignore_index=-100)
    (g_ref,) = torch.autograd.grad(ref, student.lm_head.weight)
    assert rel(loss, ref) < 2e-5 and rel(g_fused, g_ref) < 2e-5


# ----------------------------------------------------------------------------------------------------------------------
# Triton: interpreter (subprocess) and CUDA
# ----------------------------------------------------------------------------------------------------------------------


@outer_only
@pytest.mark.skipif(not triton_available(), reason="triton not installed")
def test_triton_interpreter_parity_subprocess():
    env = dict(os.environ, KD_FUSED_KD_TRITON_INNER="1", TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        __file__,
        "-q",
        "-x",
        "-p",
        "no:cacheprovider",
        "-k",
        "interp_triton",
        "-W",
        "ignore:invalid value encountered:RuntimeWarning",
    ]
    res = subprocess.run(
        cmd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    assert " passed" in res.stdout and "skipped" not in res.stdout.splitlines()[-1], res.stdout[-2000:]


TRITON_CASES = [
    (d, T, t, torch.float32, b)
    for d in DIVS
    for T in (1.0, 2.0)
    for t in ("hidden", "logits", "topk")
    for b in (T == 1.0,)
] + [(d, 1.0, "hidden", torch.bfloat16, True) for d in DIVS]


@inner_only
@pytest.mark.parametrize("divergence,temperature,teacher,dtype,bias", TRITON_CASES)
def test_interp_triton_parity(divergence, temperature, teacher, dtype, bias):
    c = make_case(
        n=21, h=20, ht=24, v=45, dtype=dtype, teacher=teacher, bias=bias, temperature=temperature, k=5, ignore_every=3
    )
    got, want = run_both(
        c,
        backend="triton",
        divergence=divergence,
        temperature=temperature,
        beta=0.3,
        hard_label_weight=0.5,
        num_items_in_batch=17,
    )
    assert_parity(got, want, TOL[("triton", dtype)])


@inner_only
def test_interp_triton_kd_only_frozen_head_and_empty():
    c = make_case(n=21, h=20, ht=24, v=45, ignore_every=3)
    xs = c.xs.clone().requires_grad_()
    loss = fused_linear_kd_loss(
        xs, c.w, c.xt, c.wt, labels=c.labels, divergence="kl", temperature=2.0, backend="triton"
    )
    loss.backward()
    xr = c.xs.clone().requires_grad_()
    ref = reference(c, xr, c.w, None, divergence="kl", temperature=2.0)[0]
    ref.backward()
    assert rel(loss, ref) < 2e-5 and rel(xs.grad, xr.grad) < 2e-5
    c.labels[:] = -100
    xs = c.xs.clone().requires_grad_()
    loss = fused_linear_kd_loss(xs, c.w, c.xt, c.wt, labels=c.labels, backend="triton", hard_label_weight=1.0)
    loss.backward()
    assert float(loss.detach()) == 0.0 and torch.all(xs.grad == 0)


@outer_only
@pytest.mark.skipif(not (torch.cuda.is_available() and triton_available()), reason="needs CUDA + triton")
@pytest.mark.parametrize("divergence", DIVS)
@pytest.mark.parametrize("teacher", ["hidden", "topk"])
def test_triton_cuda_parity(divergence, teacher):
    c = make_case(n=300, h=64, ht=96, v=1000, teacher=teacher, bias=True, temperature=2.0, k=16)
    for name in ("xs", "w", "b", "xt", "wt", "bt", "labels", "t_logits"):
        setattr(c, name, getattr(c, name).cuda())
    c.topk = tuple(t.cuda() for t in c.topk)
    got, want = run_both(c, backend="triton", divergence=divergence, temperature=2.0, hard_label_weight=0.5)
    assert_parity(got, want, (1e-4, 1e-4))
