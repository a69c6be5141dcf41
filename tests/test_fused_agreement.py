"""The fused causal-LM path logs the same teacher-student top-1 ``agreement`` as the full-logit path."""

import pytest
import torch
import torch.nn as nn
from tiny import TokenDataset, tiny_llama, training_args
from transformers import Trainer

from kd_plugins import DistillationCallback, DistillationConfig
from kd_plugins.distill.fused import top1_agreement


def test_top1_agreement_matches_full_logits_in_chunks():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    s_head, t_head = nn.Linear(8, 13), nn.Linear(6, 13, bias=False)
    hs, ht = torch.randn(11, 8, generator=g), torch.randn(11, 6, generator=g)
    valid = torch.ones(11, dtype=torch.bool)
    valid[[2, 7]] = False
    full = (s_head(hs).argmax(-1) == t_head(ht).argmax(-1))[valid].double().mean().item()
    for chunk in (1, 3, 64):
        assert top1_agreement(hs, s_head, ht, t_head, valid, chunk) == pytest.approx(full, abs=1e-12)
    same = top1_agreement(hs, s_head, hs, s_head, valid, 4)
    assert same == 1.0


def _near_copy(model):
    """The teacher's weights with a perturbed head: agreement strictly between 0 and 1."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        model.lm_head.weight.add_(torch.randn(model.lm_head.weight.shape, generator=g) * 0.01)
    return model


def test_fused_path_logs_the_plain_paths_agreement(tmp_out):
    logs = []
    for fused in (False, True):
        teacher, student = tiny_llama(seed=1, layers=3), _near_copy(tiny_llama(seed=1, layers=3))
        cfg = DistillationConfig(loss_terms="kl", hard_label_weight=0.5, fused_loss=fused, fused_chunk_size=5)
        cb = DistillationCallback(teacher, cfg)
        args = training_args(
            tmp_out + str(fused), per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=1
        )
        Trainer(model=student, args=args, train_dataset=TokenDataset(n=4, pad_last=5), callbacks=[cb]).train()
        assert cb.fused.enabled is fused
        logs.append(cb.trainer.state.log_history[0])
    assert 0.0 < logs[0]["agreement"] < 1.0
    assert logs[1]["agreement"] == pytest.approx(logs[0]["agreement"], abs=1e-6)

    teacher, student = tiny_llama(seed=1, layers=3), tiny_llama(seed=2)
    cb = DistillationCallback(teacher, DistillationConfig(loss_terms="kl", fused_loss=True, log_agreement=False))
    args = training_args(tmp_out + "off", max_steps=1)
    Trainer(model=student, args=args, train_dataset=TokenDataset(n=4), callbacks=[cb]).train()
    assert "agreement" not in cb.trainer.state.log_history[0]
