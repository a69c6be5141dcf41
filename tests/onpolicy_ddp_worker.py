"""On-policy distillation (``lmbda=1``) under torchrun (2 gloo ranks on CPU): every rank generates for its own
micro-batches. Each rank writes ``OUT_DIR/rank<r>.json`` with what it generated, its on-policy logs and a checksum of
its final student weights.

Usage: ``python -m torch.distributed.run --nproc_per_node 2 onpolicy_ddp_worker.py OUT_DIR``.
``prompt_completion_dataset`` is shared with ``test_onpolicy.py``."""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402
from tiny import tiny_llama, training_args  # noqa: E402
from torchrun_util import leave_distributed  # noqa: E402


def prompt_completion_dataset(n=8, seq=10, vocab=96, seed=0):
    """Rows of ``seq`` random tokens (ids >= 4, no special ids) whose first 3-5 tokens are the prompt (labels -100)."""
    g = torch.Generator().manual_seed(seed)
    items = []
    for i in range(n):
        ids = torch.randint(4, vocab, (seq,), generator=g)
        labels = ids.clone()
        labels[: 3 + i % 3] = -100
        items.append({"input_ids": ids, "attention_mask": torch.ones(seq, dtype=torch.long), "labels": labels})
    return items


def main(out_dir):
    from transformers import Trainer

    import kd_plugins.integrations.hf.distill as hf_distill
    from kd_plugins import DistillationCallback, DistillationConfig

    torch.set_num_threads(1)
    rank = int(os.environ.get("RANK", "0"))
    generated, original = [], hf_distill.trainer_on_policy_inputs

    def recording(*args, **kwargs):
        new, items, logs = original(*args, **kwargs)
        generated.append({"input_ids": new["input_ids"].tolist(), "labels": new["labels"].tolist(), "logs": logs})
        return new, items, logs

    hf_distill.trainer_on_policy_inputs = recording
    teacher, student = tiny_llama(seed=1, hidden=48), tiny_llama(seed=2)
    cb = DistillationCallback(teacher, DistillationConfig(loss_terms="kl", lmbda=1.0, max_new_tokens=4))
    args = training_args(out_dir, per_device_train_batch_size=2, max_steps=2, ddp_backend="gloo")
    trainer = Trainer(model=student, args=args, train_dataset=prompt_completion_dataset(), callbacks=[cb])
    trainer.train()
    assert type(trainer.model_wrapped).__name__ == "DistributedDataParallel"
    logs = [h for h in trainer.state.log_history if "on_policy_fraction" in h]
    checksum = float(sum(p.detach().double().sum() for p in student.parameters()))
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"generated": generated, "logs": logs, "checksum": checksum}, f)
    leave_distributed()  # see its docstring: interpreter teardown races gloo's worker threads


if __name__ == "__main__":
    main(sys.argv[1])
