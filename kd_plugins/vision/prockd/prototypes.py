"""The prototype memory of ProC-KD: ``K`` unit-norm prototypes learned from the teacher's local features.

The paper ("Prototype-guided Cross-task Knowledge Distillation for Large-scale Models", 2022) learns
prototypes from "the essential feature representation of objects in the teacher model"; it does not fix the
learning rule here. kd_plugins uses online spherical k-means with an EMA update, which needs no gradient and no
extra loss, and depends on the (frozen) teacher only:

* rows: every spatial position ``n`` of the teacher map gives ``u_n = t_n / ||t_n||``;
* first update: ``K`` rows of the batch chosen by k-means++ seeding on the cosine distance;
* assignment: ``c_n = argmax_k <u_n, p_k>``; batch centroid ``m_k = normalise(sum_{c_n = k} u_n)``;
* update (prototypes with at least one row): ``p_k <- normalise(momentum * p_k + (1 - momentum) * m_k)``;
* restart: a prototype with no row for ``restart_steps`` consecutive updates is re-seeded with the batch row worst
  represented by the current prototypes (lowest cosine to its nearest one): avoids dead prototypes, as in VQ
  codebooks, and splits clusters that k-means merged.

Under ``torch.distributed`` the sums and counts are all-reduced first, so every rank keeps the same prototypes.
Everything is a buffer: saved with the task state, copied by EMA, never touched by the optimizer.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["PrototypeMemory", "feature_rows"]


def feature_rows(x: torch.Tensor) -> torch.Tensor:
    """NCHW ``[B, C, H, W]`` -> rows ``[B * H * W, C]``."""
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


class PrototypeMemory(nn.Module):
    """``K`` prototypes of width ``dim`` (buffer ``prototypes``, unit rows), updated by :meth:`update`."""

    def __init__(self, num_prototypes: int, dim: int, momentum: float = 0.99, restart_steps: int = 20):
        super().__init__()
        self.num_prototypes, self.dim = int(num_prototypes), int(dim)
        self.momentum, self.restart_steps = float(momentum), int(restart_steps)
        self.register_buffer("prototypes", torch.zeros(self.num_prototypes, self.dim))
        self.register_buffer("idle_steps", torch.zeros(self.num_prototypes, dtype=torch.long))
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    @property
    def initialized(self) -> bool:
        return bool(self.num_updates > 0)

    def extra_repr(self) -> str:
        return f"num_prototypes={self.num_prototypes}, dim={self.dim}, momentum={self.momentum}"

    def checked(self) -> torch.Tensor:
        """The prototypes; raises when no update has filled them yet."""
        if not self.initialized:
            raise RuntimeError(
                "The ProC-KD prototype memory is empty: it is filled from the teacher's features by the first "
                "training step (task.train() then a forward), or by loading the task state of a trained run."
            )
        return self.prototypes

    @torch.no_grad()
    def update(self, teacher_map: torch.Tensor) -> None:
        """One spherical k-means / EMA step on the rows of the NCHW teacher map ``teacher_map``."""
        if teacher_map.dim() != 4 or teacher_map.shape[1] != self.dim:
            raise ValueError(
                f"PrototypeMemory(dim={self.dim}) needs an NCHW teacher map with {self.dim} channels, got shape "
                f"{tuple(teacher_map.shape)}"
            )
        rows = F.normalize(feature_rows(teacher_map.detach()).float(), dim=-1)
        if not self.initialized:
            self._seed(rows)
        protos = self.prototypes.float()
        assign = (rows @ protos.T).argmax(-1)
        sums = torch.zeros_like(protos).index_add_(0, assign, rows)
        counts = torch.bincount(assign, minlength=self.num_prototypes).to(rows.dtype)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(sums)
            dist.all_reduce(counts)
        hit = counts > 0
        moved = F.normalize(self.momentum * protos + (1 - self.momentum) * F.normalize(sums, dim=-1), dim=-1)
        protos = torch.where(hit[:, None], moved, protos)
        self.idle_steps.copy_(torch.where(hit, torch.zeros_like(self.idle_steps), self.idle_steps + 1))
        if self.restart_steps > 0:
            self._restart(protos, rows)
        self.prototypes.copy_(protos.to(self.prototypes.dtype))
        self.num_updates += 1

    def _restart(self, protos: torch.Tensor, rows: torch.Tensor) -> None:
        """Re-seed the prototypes idle for ``restart_steps`` updates with the worst-represented rows (lowest
        similarity to their nearest prototype): a dead prototype then splits a cluster that another one covers
        badly, the usual way out of k-means' merged-cluster optimum."""
        dead = (self.idle_steps >= self.restart_steps).nonzero().flatten()
        if len(dead) == 0:
            return
        fit = (rows @ protos.T).max(-1).values
        worst = fit.topk(min(len(dead), len(rows)), largest=False).indices
        dead = dead[: len(worst)]
        picked = rows[worst]
        if dist.is_available() and dist.is_initialized():
            dist.broadcast(picked, src=0)  # every rank re-seeds with rank 0's rows
        protos[dead] = picked
        self.idle_steps[dead] = 0

    def _seed(self, rows: torch.Tensor) -> None:
        if len(rows) < self.num_prototypes:
            raise ValueError(
                f"The first batch gives {len(rows)} teacher feature positions, fewer than num_prototypes="
                f"{self.num_prototypes}; use a larger batch, an earlier (larger) teacher feature map or fewer "
                "prototypes."
            )
        picked = rows[self._kmeans_pp(rows)]
        if dist.is_available() and dist.is_initialized():
            dist.broadcast(picked, src=0)  # every rank starts from rank 0's draw
        self.prototypes.copy_(picked.to(self.prototypes.dtype))

    def _kmeans_pp(self, rows: torch.Tensor) -> torch.Tensor:
        """k-means++ seeding on the cosine distance: each next row is drawn with probability proportional to
        ``(1 - max_j cos(row, chosen_j))^2``, so the first prototypes already cover distinct clusters."""
        chosen = [int(torch.randint(0, len(rows), ()))]
        fit = rows @ rows[chosen[0]]
        for _ in range(self.num_prototypes - 1):
            weight = (1 - fit).clamp_min(0).pow(2)
            weight[chosen] = 0
            nxt = int(torch.multinomial(weight, 1)) if weight.sum() > 0 else int(torch.randint(0, len(rows), ()))
            chosen.append(nxt)
            fit = torch.maximum(fit, rows @ rows[nxt])
        return torch.tensor(chosen, device=rows.device)
