"""``Teacher``: the one place a teacher model runs.

Every integration (HF callbacks, ``DistillationTrainer``, the timm tasks, ACM, multi-exit) holds its teacher in a
:class:`Teacher`. It freezes the model once (``requires_grad_(False)``), re-asserts ``eval()`` before every forward,
runs it under ``torch.no_grad()`` on its own device, and refuses a teacher that is (part of) the student. A teacher
is never a sub-module of anything trainable, so it never reaches an optimizer, DDP or a checkpoint.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn as nn

from .._utils import model_device, to_device, unwrap_model
from .sharded_teacher import check_sharded_placement, is_sharded

__all__ = ["Teacher", "freeze_teacher", "DTYPES"]

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}

#: Batch keys that are training targets or Trainer plumbing, never teacher inputs.
_NON_INPUT_KEYS = frozenset({"labels", "num_items_in_batch", "return_loss", "shift_labels"})


def freeze_teacher(teacher: nn.Module) -> nn.Module:
    """Eval mode and no gradients: a teacher never trains and never enters the optimizer."""
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


class Teacher:
    """A frozen teacher model and where it runs.

    Args:
        module: the teacher ``nn.Module`` (frozen here).
        device: ``None`` (the teacher must already sit with the student), ``"student"`` (moved to the student's
            device by :meth:`place`) or a device string (moved there; inputs follow it).
        dtype: optional dtype name (``"bfloat16"``, ...) the teacher is cast to by :meth:`place`.
        quantization: ``None``, ``"int8"`` or ``"nf4"``: the teacher's linear layers are quantized once by
            :meth:`place`, after the dtype cast and before the move (``distill/teacher_quant.py``).

    A teacher sharded with :func:`~kd_plugins.distill.sharded_teacher.shard_teacher` (FSDP2) runs as it is: it must
    already sit on the student's device, and is never moved, cast or quantized here.
    """

    def __init__(
        self,
        module: nn.Module,
        *,
        device: str | None = None,
        dtype: str | None = None,
        quantization: str | None = None,
    ):
        if isinstance(module, Teacher):
            module = module.module
        if not isinstance(module, nn.Module):
            raise TypeError(
                f"teacher must be an nn.Module, got {type(module).__name__}; load it first (e.g. "
                "AutoModelForCausalLM.from_pretrained(config.teacher_model_name_or_path))."
            )
        if dtype is not None and dtype not in DTYPES:
            raise ValueError(f"teacher dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        self.sharded = is_sharded(module)
        if quantization is not None:
            _check_quantization(quantization, self.sharded)
        self.module = freeze_teacher(module)
        self.device_policy = device
        self.dtype = dtype
        self.quantization = quantization
        self._quantized = False  # converted by the first place()
        self._placed: torch.device | None = None  # set by place() when the policy moves the teacher
        self._params = None

    @property
    def device(self) -> torch.device:
        """Where the teacher runs (inputs are moved there)."""
        return self._placed if self._placed is not None else model_device(self.module)

    # ------------------------------------------------------------------ placement
    def check_separate(self, student: nn.Module) -> None:
        """Refuse a teacher that is the student, shares its trainable weights, or is one of its sub-modules."""
        student = unwrap_model(student)
        if student is self.module:
            raise ValueError("The teacher is the student itself; pass a separate (frozen) teacher model.")
        tparams = {_storage_ptr(p) for p in self.module.parameters()}
        if any(_storage_ptr(p) in tparams for p in student.parameters() if p.requires_grad):
            raise ValueError(
                "The teacher shares trainable parameters with the student; pass a deep copy "
                "(copy.deepcopy(model)) as the teacher."
            )
        if any(m is self.module for m in student.modules()):
            raise ValueError(
                "The teacher is a sub-module of the student: it would be trained and saved with it. "
                "Keep the teacher outside the student model."
            )

    def place(self, student: nn.Module) -> torch.device:
        """Apply the dtype and device policy against ``student``'s device; never leave the teacher elsewhere
        silently. Returns the teacher's device."""
        s_dev, t_dev = model_device(unwrap_model(student)), model_device(self.module)
        if self.sharded:
            return check_sharded_placement(self.module, s_dev, device_policy=self.device_policy, dtype=self.dtype)
        if self.dtype is not None:
            self.module.to(DTYPES[self.dtype])
        if self.quantization is not None and not self._quantized:
            from .teacher_quant import quantize_teacher

            quantize_teacher(self.module, self.quantization)  # before the move: float weights stay where they were
            self._quantized = True
        if self.device_policy is None:
            if s_dev != t_dev:
                raise ValueError(
                    f"The teacher is on {t_dev} but the student trains on {s_dev}. Move it "
                    f"(teacher.to('{s_dev}')), or set DistillationConfig(teacher_device='student') to move it "
                    "automatically, or teacher_device='<device>' to keep it on another device."
                )
            return t_dev
        self._placed = s_dev if self.device_policy == "student" else torch.device(self.device_policy)
        self.module.to(self._placed)
        return self._placed

    @contextlib.contextmanager
    def moved_to(self, device: torch.device | str) -> Iterator[Teacher]:
        """Run on ``device`` inside the block, then move back to where it was placed (a teacher parked on CPU that
        visits the student's device only for its rows, see :class:`~kd_plugins.distill.teacher_set.TeacherSet`)."""
        if self.sharded:
            raise ValueError(
                "A sharded (FSDP2) teacher cannot be moved between devices (offload); use offload=False with it."
            )
        home = self.device
        self._placed = torch.device(device)
        self.module.to(self._placed)
        try:
            yield self
        finally:
            self.module.to(home)
            self._placed = home

    # ------------------------------------------------------------------ running
    def run(self, fn: Callable[[nn.Module], Any]) -> Any:
        """``fn(module)`` in eval mode under ``no_grad``: for custom forwards (features, intermediates)."""
        self.module.eval()  # a Trainer or task may have called .train() on everything it saw
        with torch.no_grad():
            return fn(self.module)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Forward pass; tensor arguments move to the teacher's device."""
        args = tuple(a.to(self.device) if torch.is_tensor(a) else a for a in args)
        kwargs = to_device(kwargs, self.device)
        return self.run(lambda m: m(*args, **kwargs))

    def model_inputs(self, batch: dict, *, keep: tuple[str, ...] = (), drop: tuple[str, ...] = ()) -> dict:
        """The keys of a training batch that the teacher's ``forward`` accepts (targets and Trainer keys dropped
        unless named in ``keep``), moved to the teacher's device."""
        if self._params is None:
            params = inspect.signature(self.module.forward).parameters
            var_kw = any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params.values())
            self._params = (set(params), var_kw)
        names, var_kw = self._params
        skip = (_NON_INPUT_KEYS - set(keep)) | set(drop)
        out = {k: v for k, v in batch.items() if k not in skip and (k in names or var_kw)}
        return to_device(out, self.device)

    def forward_batch(self, batch: dict, **extra: Any) -> Any:
        """Forward on a Hugging Face style batch (``model_inputs(batch)`` plus ``extra`` keyword arguments)."""
        inputs = {**self.model_inputs(batch), **extra}
        return self.run(lambda m: m(**inputs))


def _storage_ptr(p: torch.Tensor) -> int:
    """Where a parameter's data lives: for a ``DTensor`` (FSDP2) its local shard (``DTensor.data_ptr()`` is 0), for a
    DeepSpeed ZeRO-3 parameter its partition ``ds_tensor`` (its ``.data`` is an empty placeholder)."""
    if getattr(p, "ds_tensor", None) is not None:
        return p.ds_tensor.data_ptr()
    local = getattr(p, "to_local", None)
    return local().data_ptr() if callable(local) else p.data_ptr()


def _check_quantization(quantization: str, sharded: bool) -> None:
    """Fail at construction, not at the first step: unknown value, missing bitsandbytes, a sharded teacher."""
    from .teacher_quant import TEACHER_QUANTIZATIONS, require_bitsandbytes

    if quantization not in TEACHER_QUANTIZATIONS:
        raise ValueError(f"teacher quantization must be one of {TEACHER_QUANTIZATIONS}, got {quantization!r}")
    if sharded:
        raise ValueError(
            f"teacher_quantization={quantization!r} with a sharded (FSDP2) teacher is not supported: quantized "
            "layers keep their weights as buffers, which FSDP does not shard. Shard the float teacher, or quantize "
            "a replicated one."
        )
    if quantization == "nf4":
        require_bitsandbytes()
