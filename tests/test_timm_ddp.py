"""timm tasks under DDP (torchrun, 2 gloo ranks on CPU) match one process on the same global batch.

Run as a script (``python tests/test_timm_ddp.py OUT PER_RANK_BATCH KIND``, optionally under torchrun) it is the
worker: one SGD step, then it saves the student and task state. KIND: ``kd`` (KDTask: logit + feature + OFA
distillation), ``multiexit`` (MultiExitTask with a teacher), ``acm`` (ACMTask, noiseless gates, KD from the original).
"""

import os
import subprocess
import sys

import pytest
import torch
from torchrun_util import run_torchrun

HERE = os.path.dirname(os.path.abspath(__file__))
GLOBAL_BATCH = 4


def build_task(kind: str = "kd"):
    import timm

    torch.manual_seed(1)
    teacher = timm.create_model("resnet10t", pretrained=False, num_classes=10).eval()
    torch.manual_seed(2)  # LayerNorm-only student: per-rank batches give the same gradients as the full batch
    student = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=32,
        patch_size=8,
        depth=2,
        embed_dim=48,
        num_heads=2,
        num_classes=10,
    )
    torch.manual_seed(3)
    if kind == "multiexit":
        from kd_plugins.integrations.timm import MultiExitTask
        from kd_plugins.multiexit import MultiExitConfig, add_exits

        add_exits(student, layers=[1, 2])
        return MultiExitTask(student, config=MultiExitConfig(), teacher=teacher)
    if kind == "acm":
        import copy

        from kd_plugins.acm import ACMConfig, acmize
        from kd_plugins.integrations.timm import ACMTask

        original = copy.deepcopy(student).eval()
        # the budget / entropy / diversity terms are non-linear in batch statistics, so per-rank batches would not
        # reproduce the full batch exactly: parity is checked on the task + distillation terms
        cfg = ACMConfig(num_learners=2, gate_noise=False, alpha_budget=0.0, alpha_entropy=0.0, alpha_diversity=0.0)
        acmize(student, config=cfg)
        return ACMTask(student, config=cfg, teacher=original)
    from kd_plugins.integrations.timm import KDTask

    return KDTask(
        student_model=student,
        teacher_model=teacher,
        loss_terms={"kl": 1.0, "hidden_mse": 0.5, "ofa": 1.0},
        temperature=2.0,
        feature_pairs={1: 3},
        input_size=32,
        verbose=False,
    )


def data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(GLOBAL_BATCH, 3, 32, 32, generator=g), torch.randint(0, 10, (GLOBAL_BATCH,), generator=g)


def run_step(per_rank_batch: int, kind: str = "kd") -> dict:
    """One optimizer step; returns {name: tensor} of the student and the task state (rank 0 view)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    task = build_task(kind)
    if world > 1:
        task.prepare_distributed()
        tm = task.get_trainable_module()
        assert type(tm).__name__ == "DistributedDataParallel"
        assert not any(type(m).__name__ == "DistributedDataParallel" for m in task.teacher.modules())
        ddp_ids = {id(p) for p in tm.parameters()}
        assert not ddp_ids & {id(p) for p in task.teacher.parameters()}
    opt = torch.optim.SGD(task.get_trainable_module().parameters(), lr=0.5)
    x, y = data()
    sl = slice(rank * per_rank_batch, (rank + 1) * per_rank_batch)
    task.train()
    res = task(x[sl], y[sl])
    res["loss"].backward()
    opt.step()
    out = {f"student.{k}": v.detach().clone() for k, v in task.get_eval_model().state_dict().items()}
    out.update({f"task.{k}": v.detach().clone() for k, v in task.get_task_state().get("kd_modules", {}).items()})
    return out


@pytest.mark.parametrize("kind", ["kd", "multiexit", "acm"])
def test_ddp_two_gloo_ranks_match_single_process(tmp_path, kind):
    from safetensors.torch import load_file

    torch.set_num_threads(1)
    initial = {f"student.{k}": v.clone() for k, v in build_task(kind).get_eval_model().state_dict().items()}
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", HF_HUB_OFFLINE="1")
    # the single-process reference runs in a fresh interpreter too, so no global state left by earlier tests in this
    # process (thread pools, timm layer flags) can make it differ from the DDP ranks
    ref = str(tmp_path / "single.safetensors")
    r = subprocess.run(
        [sys.executable, os.path.abspath(__file__), ref, str(GLOBAL_BATCH), kind],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-4000:])
    single = load_file(ref)
    out = str(tmp_path / "ddp.safetensors")
    r = run_torchrun([os.path.abspath(__file__), out, str(GLOBAL_BATCH // 2), kind], env=env)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-4000:])
    ddp = load_file(out)
    assert set(ddp) == set(single)
    if kind == "kd":
        assert any(k.startswith("task.projectors") for k in ddp) and any(k.startswith("task.branches") for k in ddp)
    else:  # the plain model's keys: no DDP / forward-wrapper prefix
        assert not any(k.startswith(("student.module.", "student.model.")) for k in ddp)
    changed = [k for k, v in single.items() if k.startswith("student.") and not torch.equal(v, initial[k])]
    assert changed, "the step changed no student weight"
    for k, v in single.items():
        torch.testing.assert_close(ddp[k], v, rtol=1e-4, atol=1e-5, msg=k)


if __name__ == "__main__":
    import torch.distributed as dist
    from safetensors.torch import save_file

    torch.set_num_threads(1)
    sys.path.insert(0, os.path.dirname(HERE))
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("gloo")
    result = run_step(int(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else "kd")
    if int(os.environ.get("RANK", "0")) == 0:
        save_file({k: v.contiguous() for k, v in result.items()}, sys.argv[1])
    from torchrun_util import leave_distributed

    leave_distributed()  # see its docstring: interpreter teardown races gloo's worker threads
