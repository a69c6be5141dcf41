"""Sharded (FSDP2) teachers on 2 gloo ranks, or the single-process reference of the Trainer step.

Usage: ``python sharded_teacher_worker.py OUT_DIR single`` (one process) or, under torchrun,
``sharded_teacher_worker.py OUT_DIR dist``. ``dist`` checks, on every rank (results in ``OUT_DIR/rank<r>.json``):

* teacher logits under FSDP2 equal the unsharded teacher's, with different sequence lengths per rank (no deadlock);
* teacher ``generate`` with different lengths per rank stays in step (``synced_gpus``);
* the bad inputs (other device, teacher_device / teacher_dtype / int8 with a sharded teacher, sharding twice, a
  TeacherSet of several teachers) raise clear errors;
* a student under FSDP2 (``fully_shard``) with the sharded teacher, one SGD step in a plain loop through
  ``DistillationEngine``, equals the same step in one process (computed on each rank, unsharded);

then, in both modes, one Trainer step with ``DistillationCallback`` (student under DDP in ``dist``: the Trainer's FSDP
settings are ignored on CPU, see docs/large_teachers.md) whose student and projector weights the test compares.
"""

import copy
import json
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from tiny import TokenDataset, tiny_llama, training_args  # noqa: E402
from torchrun_util import leave_distributed  # noqa: E402

from kd_plugins import DistillationCallback, DistillationConfig, TeacherSet  # noqa: E402
from kd_plugins.distill import DistillationEngine  # noqa: E402
from kd_plugins.distill.scaling import LossScaling  # noqa: E402
from kd_plugins.distill.sharded_teacher import shard_teacher  # noqa: E402
from kd_plugins.distill.teacher import Teacher  # noqa: E402

CFG = dict(
    loss_terms={"kl": 1.0, "hidden_mse": 0.5},
    temperature=2.0,
    hard_label_weight=0.5,
    feature_pairs={"model.layers.1": "model.layers.1"},
)


def pair():
    return tiny_llama(seed=1, hidden=48, layers=3), tiny_llama(seed=2, hidden=32)


def micro_batch(rank: int) -> dict:
    """Rank ``r``'s micro-batch: 2 rows of ``8 + 5 r`` tokens, some labels masked (uneven counts per rank)."""
    ds = TokenDataset(n=2, seq=8 + 5 * rank, seed=10 + rank)
    batch = {k: torch.stack([it[k] for it in ds.items]) for k in ds.items[0]}
    batch["labels"][0, : 2 + rank] = -100
    return batch


def _raises(fn, needle: str) -> str:
    try:
        fn()
    except (ValueError, RuntimeError) as e:
        assert needle in str(e), str(e)
        return str(e)
    raise AssertionError(f"no error (expected one containing {needle!r})")


def check_logits_and_generation(rank: int) -> dict:
    teacher, _ = pair()
    reference = copy.deepcopy(teacher).eval()
    sharded = Teacher(shard_teacher(teacher))
    diffs = []
    for seq in (6 + 7 * rank, 11 + 2 * rank):  # different lengths on the two ranks, twice
        ids = torch.randint(4, 96, (2, seq), generator=torch.Generator().manual_seed(seq))
        with torch.no_grad():
            ref = reference(input_ids=ids).logits
        diffs.append(float((sharded(input_ids=ids).logits - ref).abs().max()))
    prompt = torch.randint(4, 96, (1, 5 + rank), generator=torch.Generator().manual_seed(rank))
    new = 2 + 3 * rank  # rank 0 stops after 2 tokens, rank 1 after 5: finished ranks keep stepping
    gen = sharded.run(lambda m: m.generate(input_ids=prompt, max_new_tokens=new, do_sample=False, pad_token_id=0))
    with torch.no_grad():
        ref_gen = reference.generate(input_ids=prompt, max_new_tokens=new, do_sample=False, pad_token_id=0)
    return {
        "logit_max_abs_diff": max(diffs),
        "generate_equal": bool(torch.equal(gen, ref_gen)),
        "param_types": sorted({type(p).__name__ for p in teacher.parameters()}),
        "requires_grad": any(p.requires_grad for p in teacher.parameters()),
        "local_numel": sum(p.to_local().numel() for p in teacher.parameters()),
        "full_numel": sum(p.numel() for p in reference.parameters()),
    }


def check_errors() -> dict:
    teacher, student = pair()
    sharded = shard_teacher(teacher)
    return {
        "other_device": _raises(lambda: Teacher(sharded).place(student.to("meta")), "sharded teacher lives on cpu"),
        "teacher_device": _raises(
            lambda: DistillationEngine(sharded, DistillationConfig(teacher_device="student")).setup(pair()[1]),
            "cannot be moved after sharding",
        ),
        "teacher_dtype": _raises(
            lambda: DistillationEngine(sharded, DistillationConfig(teacher_dtype="bfloat16")).setup(pair()[1]),
            "cannot be cast after sharding",
        ),
        "int8": _raises(lambda: DistillationEngine(sharded, DistillationConfig(teacher_quantization="int8")), "FSDP"),
        "twice": _raises(lambda: shard_teacher(sharded), "already sharded"),
        "teacher_set": _raises(lambda: DistillationEngine(TeacherSet([sharded, pair()[0]])), "deadlock"),
    }


def _engine_step(engine, student, batches, scaling) -> None:
    """Forward/backward over ``batches`` (accumulated), then one SGD step of the student and the projectors."""
    opt = torch.optim.SGD(student.parameters(), lr=1.0)
    for batch in batches:
        torch.manual_seed(0)  # the projector is created on the first call: same initial weights everywhere
        out = student(**{k: v for k, v in batch.items() if k != "labels"})
        engine.compute(batch, out, scaling=scaling).loss.backward()
    opt.step()
    engine.projector_step(lr=1.0)


def check_fsdp_student_step(rank: int, world: int) -> dict:
    """Student and teacher both under FSDP2, a plain loop through DistillationEngine, vs one process."""
    from torch.distributed.fsdp import fully_shard

    teacher, student = pair()
    cfg = DistillationConfig(**{**CFG, "hard_label_weight": 0.0})
    batches = [micro_batch(r) for r in range(world)]
    items = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)  # shifted label tokens, global batch
    ref_student, ref_engine = copy.deepcopy(student), DistillationEngine(copy.deepcopy(teacher), cfg)
    ref_engine.setup(ref_student)
    grad_accum = LossScaling(by_items=True, num_items_in_batch=items, grad_accum_steps=world)
    _engine_step(ref_engine, ref_student, batches, grad_accum)  # its projector all-reduce averages equal grads
    for layer in student.model.layers:
        fully_shard(layer)
    fully_shard(student)
    engine = DistillationEngine(shard_teacher(teacher), cfg)
    engine.setup(student)
    # per rank: token sums over the global count times the world size; FSDP averages the gradients over ranks
    _engine_step(
        engine, student, [batches[rank]], LossScaling(by_items=True, num_items_in_batch=items, items_scale=world)
    )
    ref = ref_student.state_dict()
    diffs = {k: float((v.full_tensor() - ref[k]).abs().max()) for k, v in student.state_dict().items()}
    ref_p, p = ref_engine.projectors.state_dict(), engine.projectors.state_dict()
    diffs.update({f"proj.{k}": float((v - ref_p[k]).abs().max()) for k, v in p.items()})
    moved = max(
        float((v.full_tensor() - s).abs().max())
        for v, s in zip(student.state_dict().values(), pair()[1].state_dict().values())
    )
    return {"fsdp_student_max_diff": max(diffs.values()), "fsdp_student_moved": moved, "n_tensors": len(diffs)}


def train_with_trainer(out_dir: str, args, world: int) -> dict:
    from transformers import Trainer

    teacher, student = pair()
    if world > 1:
        teacher = shard_teacher(teacher)
    cfg = DistillationConfig(**CFG, fused_loss=None if world > 1 else False)
    cb = DistillationCallback(teacher, cfg)
    ds = TokenDataset(n=4, seq=12)
    for i, it in enumerate(ds.items):  # uneven numbers of labelled tokens per sample
        it["labels"][: 2 + 3 * i] = -100
    trainer = Trainer(model=student, args=args, train_dataset=ds, callbacks=[cb])
    trainer.train()
    opt_ids = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    info = {
        "wrapped": type(trainer.model_wrapped).__name__,
        "teacher_in_optimizer": any(id(p) in opt_ids for p in teacher.parameters()),
        "fused": bool(cb.fused.enabled),
        "fused_reasons": cb.fused_reasons,
    }
    trainer.save_model(os.path.join(out_dir, "saved"))
    if int(os.environ.get("RANK", "0")) == 0:
        saved = load_file(os.path.join(out_dir, "saved", "model.safetensors"))
        info["saved_keys_are_student_keys"] = set(saved) <= set(student.state_dict())
        tensors = {f"student.{k}": v.detach().contiguous() for k, v in student.state_dict().items()}
        tensors.update({f"proj.{k}": v.detach().contiguous() for k, v in cb.engine.projectors.state_dict().items()})
        save_file(tensors, os.path.join(out_dir, "weights.safetensors"))
    return info


def main(out_dir: str, mode: str) -> None:
    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    per_device = 4 // world
    extra = {"ddp_backend": "gloo"} if world > 1 else {}
    args = training_args(
        out_dir,
        per_device_train_batch_size=per_device,
        max_steps=1,
        optim="sgd",
        learning_rate=1.0,
        max_grad_norm=0.0,
        **extra,
    )
    _ = args.device  # under torchrun this initialises the gloo process group
    results = {}
    if mode == "dist":
        rank = dist.get_rank()
        results.update(check_logits_and_generation(rank))
        results["errors"] = check_errors()
        results.update(check_fsdp_student_step(rank, world))
    results.update(train_with_trainer(out_dir, args, world))
    with open(os.path.join(out_dir, f"rank{os.environ.get('RANK', '0')}.json"), "w") as f:
        json.dump(results, f)
    leave_distributed()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
