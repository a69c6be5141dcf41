"""Several timm teachers in :class:`~kd_plugins.integrations.timm.task.KDTask`: a
:class:`~kd_plugins.distill.teacher_set.TeacherSet` as ``teacher_model``.

Each member becomes a ``timm.task.DistillationTeacher`` (its own input normalisation from its ``pretrained_cfg``) and
runs only on the rows where its weight is non-zero. Row weights come from the set's fixed ``weights`` (default
uniform), its ``router``, called as ``router({"pixel_values": x, "labels": target}) -> [B, K]`` with the batch as
the student sees it, or its per-class relevance (``TeacherSet.class_weighted``: the reference member runs first on
every row and its prediction sets the weights). A timm loader yields ``(input, target)`` pairs, so there is no
dataset column to route by: ``teacher_column`` sets are refused (use a router).

The two aggregations are the Trainer's (:mod:`kd_plugins.distill.teacher_set`): ``"mixture"`` hands the logit terms
the mixture ``T * logsumexp_i(log w_i + log softmax(z_i / T))``; ``"sum_of_divergences"`` is
``(1/B) sum_rows sum_i w_i D(p_i, q)`` with each term's per-row form. Only logit terms apply to several teachers
(feature pairs, OFA branches, CSF and patch-embedding alignment read one teacher's features); a set of one resident
teacher is unwrapped by the task and distils exactly as that teacher alone.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.nn as nn
from timm.task import DistillationTeacher
from timm.utils import unwrap_model

from ...distill.config import DistillationConfig
from ...distill.teacher import Teacher, freeze_teacher
from ...distill.teacher_set import TeacherSet, check_set_terms, mixture_logits, row_loss
from ...vision.terms import LogitTerms

__all__ = ["TimmTeacherSet"]

#: Per-teacher logits: ``(teacher index, rows it ran on, [rows, C] logits)``.
PerTeacher = list[tuple[int, torch.Tensor, torch.Tensor]]


class TimmTeacherSet(nn.Module):
    """The members of a :class:`TeacherSet` as timm ``DistillationTeacher`` modules, run on their rows.

    Args:
        teacher_set: the set (``weights`` or ``router``; ``aggregation``; ``offload`` parks members on CPU and moves
            each to the student's device only for its rows).
        resolve: turns one member module into a ``DistillationTeacher`` (the task's own teacher resolution).
        student: the student (class counts and weight sharing are checked against it).
        config: the task's resolved :class:`DistillationConfig`.
        device: the student's device.
    """

    def __init__(
        self,
        teacher_set: TeacherSet,
        resolve: Callable[[nn.Module], DistillationTeacher],
        student: nn.Module,
        config: DistillationConfig,
        device: torch.device,
    ):
        super().__init__()
        _check_set(teacher_set, config)
        self.spec, self.config, self.device = teacher_set, config, torch.device(device)
        self.members = nn.ModuleList(resolve(m) for m in teacher_set.modules)
        park = "cpu" if teacher_set.offload else None
        self.runners = [Teacher(m, device=park) for m in self.members]  # a plain list: not sub-modules twice
        for runner in self.runners:
            runner.check_separate(student)
            if park:
                runner.module.to(park)
        for member in self.members:  # the single-teacher task's class-count check, for every member
            LogitTerms(config, student, unwrap_model(member.model))
        self._row_losses: dict[str, nn.Module] = {}

    def train(self, mode: bool = True) -> TimmTeacherSet:  # noqa: ARG002 - teachers stay in eval mode
        return super().train(False)

    def freeze(self) -> None:
        for m in self.members:
            freeze_teacher(m)

    # ------------------------------------------------------------------------------------------------ forward
    def forward_rows(
        self,
        x: torch.Tensor,
        target: torch.Tensor,
        to_teacher: Callable[[DistillationTeacher, torch.Tensor], torch.Tensor],
    ) -> tuple[torch.Tensor, PerTeacher]:
        """``([B, K] row weights, per-teacher logits on their rows)``; ``to_teacher(member, x_rows)`` prepares a
        member's input (re-normalisation, resize)."""
        batch = x.shape[0]

        def run_rows(k: int, x_rows: torch.Tensor) -> torch.Tensor:
            member, runner = self.members[k], self.runners[k]
            with self._resident(runner):
                return runner.run(lambda m: m(to_teacher(member, x_rows))).to(x.device)

        inputs = {"pixel_values": x, "labels": target}
        weights, done = self.spec.weights_and_reference(inputs, batch, lambda k: run_rows(k, x), lambda z: z)
        per_teacher: PerTeacher = []
        for k in range(len(self.members)):
            if k in done:  # the reference member of a class-weighted set ran on every row
                per_teacher.append((k, torch.arange(batch), done[k]))
                continue
            rows = (weights[:, k] > 0).nonzero().flatten()
            if rows.numel() == 0:
                continue
            per_teacher.append((k, rows, run_rows(k, x if rows.numel() == batch else x[rows.to(x.device)])))
        return weights, per_teacher

    @contextlib.contextmanager
    def _resident(self, runner: Teacher) -> Iterator[None]:
        if not self.spec.offload:
            yield
            return
        with runner.moved_to(self.device):
            yield

    # ------------------------------------------------------------------------------------------------ objectives
    def mixture(self, weights: torch.Tensor, per_teacher: PerTeacher, batch: int) -> torch.Tensor:
        """The mixture teacher as logits ``T * log p_mix`` (softmax at ``T`` gives ``p_mix``)."""
        device = per_teacher[0][2].device
        return mixture_logits(
            [(k, rows, {"logits": z}) for k, rows, z in per_teacher], weights, self.config.temperature, batch, device
        )

    def sum_of_divergences(
        self, student_logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, per_teacher: PerTeacher
    ) -> dict[str, torch.Tensor]:
        """``(1/B) sum_rows sum_i w_i D_name(p_i, q)`` for every logit term."""
        batch, device = student_logits.shape[0], student_logits.device
        values = {}
        for name in [n for n, k in self.config.kinds.items() if k == "logits"]:
            total = student_logits.new_zeros((), dtype=torch.float32)
            for k, rows, t_logits in per_teacher:
                rows_dev = rows.to(device)
                per_row = self._row_loss(name)(student_logits[rows_dev], t_logits, labels=labels[rows_dev])
                total = total + (per_row.float() * weights[rows, k].to(device)).sum()
            values[name] = total / max(batch, 1)
        return values

    def _row_loss(self, name: str) -> nn.Module:
        if name not in self._row_losses:
            self._row_losses[name] = row_loss(self.config, name, "logits")
        return self._row_losses[name]


def _check_set(teacher_set: TeacherSet, config: DistillationConfig) -> None:
    if teacher_set.teacher_column is not None:
        raise ValueError(
            f"KDTask got a TeacherSet that routes rows by the column {teacher_set.teacher_column!r}, but timm loaders "
            "yield (input, target) pairs with no columns. Route with router=lambda batch: weights (batch holds "
            "'pixel_values' and 'labels'), or give fixed weights."
        )
    check_set_terms(config, teacher_set.aggregation, kinds=("logits",), where="KDTask with several teachers")
