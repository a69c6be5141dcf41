"""One distillation step; run under torchrun (2 gloo ranks) or in a single process. Saves the results."""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import Trainer  # noqa: E402

from kd_plugins import DistillationCallback, DistillationConfig  # noqa: E402
from tiny import TokenDataset, tiny_llama, training_args  # noqa: E402


def make_dataset():
    ds = TokenDataset(n=4, seq=12)
    for i, it in enumerate(ds.items):  # uneven numbers of labelled tokens per sample
        it["labels"][: 2 + 3 * i] = -100
    return ds


def main(out_file, per_device_batch):
    torch.set_num_threads(1)
    teacher, student = tiny_llama(seed=1, hidden=48), tiny_llama(seed=2, hidden=32)
    cfg = DistillationConfig(loss_terms={"kl": 1.0, "hidden_mse": 0.5}, temperature=2.0, hard_label_weight=0.5,
                             feature_pairs={"model.layers.1": "model.layers.1"})
    cb = DistillationCallback(teacher, cfg)
    extra = {"ddp_backend": "gloo"} if int(os.environ.get("WORLD_SIZE", "1")) > 1 else {}
    args = training_args(os.path.dirname(out_file), per_device_train_batch_size=per_device_batch, max_steps=1,
                         optim="sgd", learning_rate=1.0, max_grad_norm=0.0, **extra)
    trainer = Trainer(model=student, args=args, train_dataset=make_dataset(), callbacks=[cb])
    trainer.train()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        assert type(trainer.model_wrapped).__name__ == "DistributedDataParallel"
        assert trainer.model_wrapped.module is student
    opt_ids = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert not any(id(p) in opt_ids for p in teacher.parameters())
    assert not any(type(m).__name__ == "DistributedDataParallel" for m in [teacher])
    if int(os.environ.get("RANK", "0")) == 0:
        tensors = {f"student.{k}": v.detach().contiguous() for k, v in student.state_dict().items()}
        tensors.update({f"proj.{k}": v.detach().contiguous() for k, v in cb.engine.projectors.state_dict().items()})
        save_file(tensors, out_file)
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        # Leave together: a rank exiting while its peer still talks to gloo can abort the peer (seen once in CI).
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
