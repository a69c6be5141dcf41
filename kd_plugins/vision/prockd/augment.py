"""The task-adaptive feature augmentation of ProC-KD: student local features read the teacher's prototypes.

For a student feature map ``S`` (rows ``s_n``, width ``C_s``) and the prototypes ``P`` (``K x C_t``, unit rows):

* query ``q_n = W_q s_n`` (1x1 conv ``C_s -> C_t``);
* attention over the prototypes ``a_n = softmax_k(<q_n / ||q_n||, p_k> / tau)`` (the same form as the teacher's
  assignment, so :func:`kd_plugins.losses.prototype_kl` compares the two directly);
* read-out ``r_n = sum_k a_nk p_k`` (the prototypes are detached: the student never moves them);
* augmented feature ``s'_n = s_n + gamma * W_o r_n`` (``W_o``: 1x1 conv ``C_t -> C_s``, ``gamma``: one learned gate
  per channel, initialised at 0 so training starts from the plain student);
* ``W_p s'_n`` (1x1 conv ``C_s -> C_t``) is what :func:`kd_plugins.losses.prototype_mse` compares to the teacher's
  prototype reconstruction.

"Task-adaptive" (the paper's term): ``W_o`` and ``gamma`` are trained by the student's task loss on the augmented
features (``augmented_task_weight``), so only the prototype information that helps the student's own label space is
mixed in. The module is a training aid: the student's checkpoint does not contain it and inference runs the plain
student.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ...losses.prototype import prototype_log_assignments

__all__ = ["PrototypeAugmentation"]


class PrototypeAugmentation(nn.Module):
    """``forward(s, prototypes) -> {"query", "augmented", "projected"}`` on NCHW student maps (see module doc)."""

    def __init__(self, student_dim: int, teacher_dim: int, temperature: float = 0.1):
        super().__init__()
        self.temperature = float(temperature)
        self.query = nn.Conv2d(student_dim, teacher_dim, 1)
        self.out = nn.Conv2d(teacher_dim, student_dim, 1)
        self.gate = nn.Parameter(torch.zeros(student_dim))
        self.project = nn.Conv2d(student_dim, teacher_dim, 1)

    def forward(self, s: torch.Tensor, prototypes: torch.Tensor) -> dict[str, torch.Tensor]:
        if s.dim() != 4 or s.shape[1] != self.query.in_channels:
            raise ValueError(
                f"PrototypeAugmentation expects an NCHW student map with {self.query.in_channels} channels, got "
                f"shape {tuple(s.shape)}"
            )
        q = self.query(s)
        p = prototypes.detach().to(q.dtype)
        attn = prototype_log_assignments(q.permute(0, 2, 3, 1), p, self.temperature).exp()
        readout = (attn @ p).permute(0, 3, 1, 2)
        augmented = s + self.gate.view(1, -1, 1, 1).to(s.dtype) * self.out(readout)
        return {"query": q, "augmented": augmented, "projected": self.project(augmented)}
