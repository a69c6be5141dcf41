"""kd_plugins.speculative.few_row_gemm: few-row linear products in the GEMM layout, same results as nn.Linear."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from tiny import tiny_llama

from kd_plugins.kernels.heads import UnfusableHeadError, check_fusable_head
from kd_plugins.quant import quantize
from kd_plugins.speculative import (
    FewRowLinear,
    measure_speculative,
    restore_linear,
    restrict_draft_vocab,
    use_few_row_gemm,
)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(1, 12), (2, 12), (1, 1, 12), (2, 3, 12), (17, 12), (4, 5, 12)])
def test_forward_and_gradients_equal_nn_linear_at_every_row_count(bias, shape):
    torch.manual_seed(0)
    ref = torch.nn.Linear(12, 7, bias=bias)
    fast = copy.deepcopy(ref)
    use_few_row_gemm(fast, max_rows=16)
    fast.one_row_gemm = True  # the one-row route too (a head's decode step)
    x = torch.randn(*shape, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    out_ref, out_fast = ref(x), fast(x2)
    assert out_fast.shape == out_ref.shape == (*shape[:-1], 7)
    torch.testing.assert_close(out_fast, out_ref, rtol=1e-5, atol=1e-6)
    grad = torch.randn_like(out_ref)
    out_ref.backward(grad)
    out_fast.backward(grad)
    torch.testing.assert_close(x2.grad, x.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fast.weight.grad, ref.weight.grad, rtol=1e-5, atol=1e-6)
    if bias:
        torch.testing.assert_close(fast.bias.grad, ref.bias.grad, rtol=1e-5, atol=1e-6)


def test_calls_outside_the_few_row_range_are_plain_linear(monkeypatch):
    layer = torch.nn.Linear(6, 4)
    use_few_row_gemm(layer, max_rows=4)
    calls = []
    real_mm = torch.mm
    monkeypatch.setattr(torch, "mm", lambda *a: calls.append(a[1].shape) or real_mm(*a))
    for rows in (1, 2, 4, 5, 0):
        x = torch.randn(rows, 6)
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))
    assert calls == [(6, 2), (6, 4)]  # one row (not a head), five rows (> max_rows) and no rows: F.linear


def test_use_few_row_gemm_keeps_parameters_ties_keys_and_greedy_output():
    model = tiny_llama(vocab=96, layers=2).eval()
    model.lm_head.weight = model.model.embed_tokens.weight  # a tied head, as SmolLM2's
    ref = copy.deepcopy(model)
    keys = list(model.state_dict())
    params = {name: p for name, p in model.named_parameters()}
    linears = sum(type(m) is torch.nn.Linear for m in model.modules())
    assert use_few_row_gemm(model) == linears
    assert use_few_row_gemm(model) == 0  # idempotent
    assert list(model.state_dict()) == keys
    assert {name: p for name, p in model.named_parameters()} == params  # the same Parameter objects
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    assert isinstance(model.lm_head, torch.nn.Linear) and type(model.lm_head) is FewRowLinear
    assert model.lm_head.one_row_gemm and not model.model.layers[0].mlp.up_proj.one_row_gemm
    ids = torch.tensor([[3, 14, 15, 9, 26, 5]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=1e-5, atol=1e-5)
        kwargs = dict(max_new_tokens=10, do_sample=False, attention_mask=torch.ones_like(ids))
        assert torch.equal(model.generate(ids, **kwargs), ref.generate(ids, **kwargs))
    with pytest.raises(UnfusableHeadError, match="fused_loss=False"):  # a serving form: the fused loss refuses it
        check_fusable_head(model)
    assert restore_linear(model) == linears
    assert all(type(m) is not FewRowLinear for m in model.modules())
    assert not hasattr(model.lm_head, "one_row_gemm")
    assert check_fusable_head(model) is model.lm_head


def test_restricted_and_quantized_drafts_serve_losslessly_with_few_row_gemm():
    target = tiny_llama(vocab=96, layers=2, seed=0).eval()
    target.generation_config.eos_token_id = None
    draft = restrict_draft_vocab(copy.deepcopy(target), torch.arange(0, 96, 2))
    quantize(draft, method="per_token")  # the draft's body in int8: QuantizedLinear is not switched
    quantized = sum(type(m).__name__ == "QuantizedLinear" for m in draft.modules())
    assert quantized > 0
    use_few_row_gemm(target)
    assert use_few_row_gemm(draft) == 1  # only the restricted head's projection was still an nn.Linear
    assert draft.get_output_embeddings().proj.one_row_gemm
    report = measure_speculative(target, draft, [[5, 6, 7], [8, 9, 10, 11]], num_draft_tokens=3, max_new_tokens=12)
    assert report.all_lossless and report.rounds > 0


def test_bad_max_rows_is_refused():
    with pytest.raises(ValueError, match="max_rows"):
        use_few_row_gemm(torch.nn.Linear(2, 2), max_rows=1)


@pytest.mark.real
def test_smollm2_with_few_row_gemm_keeps_its_logits_and_greedy_text():
    """SmolLM2-135M-Instruct: few-row GEMMs change logits only by float rounding at 1 row (decode), 5 rows (a
    gamma-4 verification) and a whole prompt, keep greedy text, and assisted generation stays lossless."""
    from pathlib import Path

    smollm2 = Path(__file__).resolve().parents[1] / ".cache" / "assets" / "smollm2-135m-instruct"
    if not (smollm2 / "model.safetensors").is_file():
        pytest.skip(f"{smollm2} not converted (benchmarks.data.lm.smollm2_dir creates it)")
    from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

    import kd_plugins

    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(smollm2)
    plain = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    fast = copy.deepcopy(plain)
    assert kd_plugins.use_few_row_gemm(fast) == 30 * 7 + 1  # 7 projections per block and the tied head
    assert fast.lm_head.weight is fast.model.embed_tokens.weight
    ids = tok("The history of the city begins in the twelfth century, when", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        cache_plain, cache_fast = DynamicCache(), DynamicCache()
        prefix = ids[:, :-5]
        out_plain = plain(prefix, past_key_values=cache_plain).logits
        out_fast = fast(prefix, past_key_values=cache_fast).logits
        torch.testing.assert_close(out_fast, out_plain, rtol=0, atol=2e-3)
        for rows in (ids[:, -5:-4], ids[:, -4:]):  # a decode step, then a 4-row block as in a verification
            step_plain = plain(rows, past_key_values=cache_plain).logits
            step_fast = fast(rows, past_key_values=cache_fast).logits
            torch.testing.assert_close(step_fast, step_plain, rtol=0, atol=2e-3)
            assert torch.equal(step_fast.argmax(-1), step_plain.argmax(-1))
        kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False)
        assert torch.equal(fast.generate(ids, **kwargs), plain.generate(ids, **kwargs))
    draft = kd_plugins.inherit_student(plain, num_layers=6, strategy="first").eval()
    use_few_row_gemm(draft)
    report = measure_speculative(fast, draft, [ids[0].tolist()], tok, num_draft_tokens=4, max_new_tokens=24)
    assert report.all_lossless and report.rounds > 0
