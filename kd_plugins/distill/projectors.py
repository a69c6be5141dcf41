"""``ProjectorBank``: learned projectors that map student features to the teacher's width.

They live outside the student (so they never reach its ``state_dict`` or a plain checkpoint), are created lazily
once the widths are known, have their own AdamW optimizer that the adapter steps after each optimizer step, and are
saved as ``kd_plugins_state.safetensors`` beside each checkpoint (restored on resume).
"""

from __future__ import annotations

import json
import logging
import os

import torch
import torch.nn as nn

from ..losses.feature import FeatureProjector

__all__ = ["ProjectorBank", "STATE_FILE"]

STATE_FILE = "kd_plugins_state.safetensors"

logger = logging.getLogger("kd_plugins.distill")


class ProjectorBank:
    """Named projectors plus their optimizer.

    Args:
        enabled: when ``False`` a width mismatch raises instead of creating a projector.
        lr: projector learning rate (``None``: follow the learning rate passed to :meth:`step`, 1e-3 before).
    """

    def __init__(self, *, enabled: bool = True, lr: float | None = None):
        self.enabled = enabled
        self.lr = lr
        self.modules = nn.ModuleDict()
        self.optimizer: torch.optim.Optimizer | None = None
        self._pending: dict | None = None

    def __len__(self) -> int:
        return len(self.modules)

    def get(self, key: str, s_dim: int, t_dim: int, device) -> nn.Module | None:
        """The projector for ``key`` (``None`` when the widths match), created on first use."""
        if s_dim == t_dim:
            return None
        if not self.enabled:
            raise ValueError(
                f"Feature widths differ for {key} (student {s_dim}, teacher {t_dim}) and "
                "feature_projector=False; enable the projector or pick layers of equal width."
            )
        safe = key.replace(".", "__")
        if safe not in self.modules:
            self.modules[safe] = FeatureProjector(s_dim, t_dim).to(device)
            if self.lr is None:  # a fresh random map at a fine-tuning lr barely moves (docs/teacher_cache.md)
                logger.info(
                    "kd_plugins: learned projector %s (%d -> %d) steps at the Trainer's learning rate; a projector "
                    "starts random, so a higher DistillationConfig(projector_lr=...) (e.g. 1e-2) often trains better",
                    key,
                    s_dim,
                    t_dim,
                )
            if self._pending is not None:
                self._load_module_state(safe)
            self._build_optimizer()
        return self.modules[safe]

    def add(self, key: str, module: nn.Module) -> nn.Module:
        """Register a trainable module built elsewhere (MST-Distill's router) under ``key``: it is then stepped,
        saved and restored with the projectors. A key already registered keeps its module, which is returned."""
        safe = key.replace(".", "__")
        if safe not in self.modules:
            self.modules[safe] = module
            if self._pending is not None:
                self._load_module_state(safe)
            self._build_optimizer()
        return self.modules[safe]

    def _build_optimizer(self) -> None:
        params = list(self.modules.parameters())
        if not params:
            return
        self.optimizer = torch.optim.AdamW(params, lr=self.lr or 1e-3, weight_decay=0.0)
        pending = self._pending
        if pending is not None and pending.get("optimizer") is not None and len(params) == pending.get("n_params"):
            self._load_optimizer_state()

    def step(self, lr: float | None = None, grad_scale: float | None = None) -> None:
        """All-reduce projector grads across ranks (they are outside DDP), unscale, step and zero them."""
        opt = self.optimizer
        if opt is None:
            return
        params = [p for p in self.modules.parameters() if p.grad is not None]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            ws = torch.distributed.get_world_size()
            for p in params:
                torch.distributed.all_reduce(p.grad)
                p.grad.div_(ws)
        if grad_scale:
            for p in params:
                p.grad.div_(grad_scale)
        if any(not torch.isfinite(p.grad).all() for p in params):
            opt.zero_grad(set_to_none=True)  # fp16 overflow step: skip, like the GradScaler does
            return
        if lr is not None:
            for g in opt.param_groups:
                g["lr"] = self.lr if self.lr else lr
        opt.step()
        opt.zero_grad(set_to_none=True)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Projector weights and their optimizer state, flattened for safetensors."""
        out = {f"projectors.{k}": v.detach().cpu().contiguous() for k, v in self.modules.state_dict().items()}
        if self.optimizer is not None:
            for pid, s in self.optimizer.state_dict()["state"].items():
                for k, v in s.items():
                    t = v if torch.is_tensor(v) else torch.tensor(v)
                    out[f"optimizer.{pid}.{k}"] = t.detach().cpu().contiguous()
        return out

    def save(self, directory: str) -> str | None:
        """Write projector (+ optimizer) state into ``directory`` atomically. Returns the path, or None if empty."""
        if not len(self.modules):
            return None
        from safetensors.torch import save_file

        meta = {
            "format": "kd_plugins",
            "n_params": str(len(list(self.modules.parameters()))),
            "projectors": json.dumps(sorted(self.modules.keys())),
        }
        path = os.path.join(directory, STATE_FILE)
        tmp = path + ".tmp"
        save_file(self.state_dict(), tmp, metadata=meta)
        os.replace(tmp, path)
        return path

    def load(self, directory: str) -> bool:
        """Queue the state saved in ``directory`` (applied as each projector is created). Returns found."""
        path = os.path.join(directory, STATE_FILE)
        if not os.path.exists(path):
            return False
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        if meta.get("format") != "kd_plugins":
            raise ValueError(f"{path} is not a kd_plugins state file")
        opt = {k[len("optimizer.") :]: v for k, v in tensors.items() if k.startswith("optimizer.")}
        self._pending = {
            "projectors": {k[len("projectors.") :]: v for k, v in tensors.items() if k.startswith("projectors.")},
            "optimizer": opt or None,
            "n_params": int(meta.get("n_params", 0)),
        }
        for name in list(self.modules.keys()):
            self._load_module_state(name)
        if len(self.modules):
            self._build_optimizer()
        return True

    def _load_module_state(self, name: str) -> None:
        prefix = name + "."
        sd = {k[len(prefix) :]: v for k, v in self._pending["projectors"].items() if k.startswith(prefix)}
        if sd:
            self.modules[name].load_state_dict(sd)

    def _load_optimizer_state(self) -> None:
        state: dict[int, dict] = {}
        for key, v in self._pending["optimizer"].items():
            pid, name = key.split(".", 1)
            state.setdefault(int(pid), {})[name] = v
        sd = self.optimizer.state_dict()
        sd["state"] = state
        self.optimizer.load_state_dict(sd)
