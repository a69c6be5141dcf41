"""Sharded (FSDP2) teachers on 2 gloo ranks (torchrun, CPU): exact teacher logits with different sequence lengths
per rank, generation in step, clear errors, and one step of student updates equal to a single process, with the
student under FSDP2 (plain loop through DistillationEngine) and under DDP (HF Trainer + DistillationCallback)."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from torchrun_util import run_torchrun

HERE = os.path.dirname(__file__)


def test_shard_teacher_needs_a_process_group():
    from tiny import tiny_llama

    from kd_plugins.distill.sharded_teacher import default_shard_units, is_sharded, shard_teacher

    teacher = tiny_llama(layers=3)
    assert default_shard_units(teacher) == ["model.layers.0", "model.layers.1", "model.layers.2"]
    with pytest.raises(RuntimeError, match="needs an initialised process group"):
        shard_teacher(teacher)
    assert not is_sharded(teacher)


def test_sharded_teacher_two_ranks(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=HERE, MASTER_ADDR="127.0.0.1")
    single, ddp = tmp_path / "single", tmp_path / "dist"
    single.mkdir(), ddp.mkdir()
    worker = os.path.join(HERE, "sharded_teacher_worker.py")
    r = subprocess.run(
        [sys.executable, worker, str(single), "single"], env=env, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_torchrun([worker, str(ddp), "dist"], env=env, timeout=240)  # a deadlock fails here instead of hanging
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-4000:])
    for rank in (0, 1):
        res = json.loads((ddp / f"rank{rank}.json").read_text())
        assert res["logit_max_abs_diff"] <= 1e-6, res
        assert res["generate_equal"], res
        assert res["param_types"] == ["DTensor"] and not res["requires_grad"]
        assert res["local_numel"] < 0.6 * res["full_numel"]  # each rank holds about half of the teacher
        assert set(res["errors"]) == {"other_device", "teacher_device", "teacher_dtype", "int8", "twice", "teacher_set"}
        assert res["fsdp_student_max_diff"] < 1e-5 < res["fsdp_student_moved"], res
        assert res["wrapped"] == "DistributedDataParallel" and not res["teacher_in_optimizer"]
        assert not res["fused"] and any("sharded (FSDP2)" in x for x in res["fused_reasons"])
    assert json.loads((ddp / "rank0.json").read_text())["saved_keys_are_student_keys"]
    a, b = load_file(single / "weights.safetensors"), load_file(ddp / "weights.safetensors")
    assert set(a) == set(b) and any(k.startswith("proj.") for k in a)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)


def test_zero3_partitioned_parameters_count_as_sharded():
    """DeepSpeed is not installed here: a ZeRO-3 partitioned parameter is imitated (empty ``.data``, the rank's
    partition in ``ds_tensor``, an id in ``ds_id``) to check what kd_plugins reads from one."""
    from tiny import tiny_llama

    from kd_plugins.distill.sharded_teacher import is_sharded
    from kd_plugins.distill.teacher import Teacher

    def partition(model):
        for i, p in enumerate(model.parameters()):
            p.ds_tensor, p.ds_id = p.data.flatten()[: max(1, p.numel() // 2)].clone(), i
            p.data = torch.empty(0)
        return model

    teacher, student = partition(tiny_llama(seed=1)), partition(tiny_llama(seed=2))
    assert is_sharded(teacher) and not is_sharded(tiny_llama())
    Teacher(teacher).check_separate(student)  # empty placeholders are not shared weights
    with pytest.raises(ValueError, match="cannot be moved after sharding"):
        Teacher(teacher, device="student").place(student)
