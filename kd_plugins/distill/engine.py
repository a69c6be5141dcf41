"""Framework-agnostic distillation engine.

``DistillationEngine`` owns the frozen teacher, the feature hooks, the loss modules and the learned projectors.
Integrations (HF Trainer callback / subclass, timm task) call :meth:`DistillationEngine.compute` with the student's
inputs and outputs and add the returned term to their task loss. Projectors live outside the student (so they never
reach its ``state_dict``) and have their own optimizer, stepped by the integration after each optimizer step.
"""

from __future__ import annotations

import difflib
import inspect
import json
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..losses import get_loss
from ..losses._common import IGNORE_INDEX
from ..losses.feature import FeatureProjector, mean_pool
from .config import DistillationConfig

STATE_FILE = "kd_plugins_state.safetensors"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
_SEQUENCE_LEVEL_TASKS = ("seq_classification", "encoder")


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DDP / DataParallel / accelerate / torch.compile wrappers (not peft: its base model is the student)."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module) and type(model).__name__ in (
            "DistributedDataParallel", "DataParallel", "FullyShardedDataParallel", "ModelForward"
        ):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def detect_task(model: nn.Module) -> str:
    """Guess the student task from the model class (override with ``DistillationConfig.task``)."""
    m = unwrap_model(model)
    if hasattr(m, "get_base_model"):  # peft
        m = m.get_base_model()
    name = type(m).__name__
    cfg = getattr(m, "config", None)
    if getattr(cfg, "is_encoder_decoder", False):
        return "seq2seq"
    for suffix, task in (("ForCausalLM", "causal_lm"), ("LMHeadModel", "causal_lm"), ("ForMaskedLM", "masked_lm"),
                         ("ForSequenceClassification", "seq_classification"), ("ForImageClassification",
                                                                              "seq_classification"),
                         ("ForTokenClassification", "token_classification")):
        if name.endswith(suffix):
            return task
    if name.endswith("Model"):
        return "encoder"
    raise ValueError(f"Cannot infer the task of {name}; set DistillationConfig.task to one of "
                     "causal_lm, masked_lm, seq_classification, token_classification, seq2seq, encoder.")


def model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _first_tensor(out: Any) -> torch.Tensor:
    if torch.is_tensor(out):
        return out
    if isinstance(out, (tuple, list)) and out and torch.is_tensor(out[0]):
        return out[0]
    if isinstance(out, dict):
        for key in ("last_hidden_state", "hidden_states", "logits"):
            if torch.is_tensor(out.get(key)):
                return out[key]
    raise TypeError(f"Cannot take a feature tensor from a module output of type {type(out).__name__}")


class FeatureRecorder:
    """Forward hooks that keep the latest output of named modules."""

    def __init__(self, model: nn.Module, names: list[str], role: str):
        self.outputs: dict[str, torch.Tensor] = {}
        self.handles = []
        modules = dict(model.named_modules())
        for name in names:
            if name not in modules:
                close = difflib.get_close_matches(name, list(modules), n=5, cutoff=0.5)
                raise ValueError(
                    f"feature_pairs: the {role} has no module named {name!r}. "
                    + (f"Close matches: {', '.join(close)}. " if close else "")
                    + f"List names with [n for n, _ in {role}.named_modules()]."
                )
            self.handles.append(modules[name].register_forward_hook(self._hook(name)))

    def _hook(self, name):
        def fn(module, args, output):
            self.outputs[name] = _first_tensor(output)

        return fn

    def pop(self, name: str) -> torch.Tensor:
        if name not in self.outputs:
            raise RuntimeError(f"feature module {name!r} did not run in the last forward pass")
        return self.outputs.pop(name)

    def remove(self):
        for h in self.handles:
            h.remove()
        self.handles.clear()
        self.outputs.clear()


@dataclass
class KDResult:
    """What :meth:`DistillationEngine.compute` returns."""

    loss: torch.Tensor  # weighted sum of the distillation terms, normalised like the task loss
    terms: dict[str, torch.Tensor] = field(default_factory=dict)  # per-term means over this batch (for logs)
    metrics: dict[str, float] = field(default_factory=dict)  # agreement etc.


class DistillationEngine:
    """Teacher + losses + projectors for one student.

    Args:
        teacher: the teacher model (frozen here: ``requires_grad_(False)``, ``eval()`` before every forward).
        config: a :class:`DistillationConfig`.
        teacher_tokenizer / student_tokenizer: optional; when both are given they are compared. Different
            tokenizers are only accepted for sequence-level objectives (pooled embeddings, sequence
            classification), where the student's text is re-tokenised for the teacher.
    """

    def __init__(self, teacher: nn.Module, config: DistillationConfig | None = None, *, teacher_tokenizer=None,
                 student_tokenizer=None):
        if not isinstance(teacher, nn.Module):
            raise TypeError(f"teacher must be an nn.Module, got {type(teacher).__name__}; load it first (e.g. "
                            "AutoModelForCausalLM.from_pretrained(config.teacher_model_name_or_path)).")
        self.teacher = teacher
        self.config = config or DistillationConfig()
        self.teacher_tokenizer = teacher_tokenizer
        self.student_tokenizer = student_tokenizer
        self.retokenize = False
        self.losses: dict[str, nn.Module] = {}
        self.projectors = nn.ModuleDict()
        self.projector_optimizer: torch.optim.Optimizer | None = None
        self._pending_state: dict | None = None
        self._student_rec: FeatureRecorder | None = None
        self._teacher_rec: FeatureRecorder | None = None
        self.task: str | None = None
        self.student: nn.Module | None = None
        self.teacher_device: torch.device | None = None
        self.step = 0
        teacher.requires_grad_(False)
        teacher.eval()

    # ------------------------------------------------------------------ setup
    def setup(self, student: nn.Module) -> None:
        """Validate the pair and install hooks. Call once the student sits on its training device."""
        cfg = self.config
        student = unwrap_model(student)
        if student is self.teacher:
            raise ValueError("The teacher is the student itself; pass a separate (frozen) teacher model.")
        tparams = {p.data_ptr() for p in self.teacher.parameters()}
        if any(p.data_ptr() in tparams for p in student.parameters() if p.requires_grad):
            raise ValueError("The teacher shares trainable parameters with the student; pass a deep copy "
                             "(copy.deepcopy(model)) as the teacher.")
        if any(m is self.teacher for m in student.modules()):
            raise ValueError("The teacher is a sub-module of the student: it would be trained and saved with it. "
                             "Keep the teacher outside the student model.")
        self.student = student
        self.task = cfg.task if cfg.task != "auto" else detect_task(student)
        if self.task == "encoder" and any(k == "logits" for k in cfg.kinds.values()):
            raise ValueError(f"{type(student).__name__} is a bare encoder (no logits); use embedding losses "
                             "(embedding_mse, embedding_cosine, affinity_kl, ...) or hidden-state losses.")
        if self.task != "encoder" and any(k == "embedding" for k in cfg.kinds.values()) and cfg.task == "auto":
            raise ValueError(f"Embedding losses pool last_hidden_state, which {type(student).__name__} does not "
                             "return; set task='encoder' and pass the bare encoder, or use logit losses.")
        # Teacher placement: never silently leave it on another device.
        s_dev, t_dev = model_device(student), model_device(self.teacher)
        if cfg.teacher_dtype is not None:
            self.teacher.to(_DTYPES[cfg.teacher_dtype])
        if cfg.teacher_device is None:
            if s_dev != t_dev:
                raise ValueError(
                    f"The teacher is on {t_dev} but the student trains on {s_dev}. Move it "
                    f"(teacher.to('{s_dev}')), or set DistillationConfig(teacher_device='student') to move it "
                    "automatically, or teacher_device='<device>' to keep it on another device."
                )
            self.teacher_device = t_dev
        elif cfg.teacher_device == "student":
            self.teacher.to(s_dev)
            self.teacher_device = s_dev
        else:
            self.teacher_device = torch.device(cfg.teacher_device)
            self.teacher.to(self.teacher_device)
        self._check_tokenizers()
        self._check_vocab(student)
        # Losses (projector-free here; projectors are created lazily once widths are known).
        for name, kind in cfg.kinds.items():
            kw = dict(cfg.loss_kwargs.get(name, {}))
            if kind == "logits":
                kw.setdefault("temperature", cfg.temperature)
                self.losses[name] = get_loss(name, **kw)
            elif kind == "hidden":
                self.losses[name] = get_loss(name, **kw)  # projector handled by the engine
            else:
                self.losses[name] = get_loss(name, **kw)
        if any(k == "attention" for k in cfg.kinds.values()):
            for key in ("attention_probs_dropout_prob", "attention_dropout"):
                p = getattr(getattr(student, "config", None), key, 0.0) or 0.0
                if p > 0:
                    raise ValueError(
                        f"Attention losses need the student's attention maps, but Hugging Face models return them "
                        f"after dropout ({key}={p}), which would distil randomly zeroed maps. Load the student with "
                        f"{key}=0.0 (e.g. from_pretrained(..., {key}=0.0))."
                    )
        if "dkd" in self.losses and self.task in ("encoder",):
            raise ValueError("DKD needs class logits and labels")
        if cfg.feature_pairs:
            self.remove_hooks()
            self._student_rec = FeatureRecorder(student, list(cfg.feature_pairs), "student")
            self._teacher_rec = FeatureRecorder(self.teacher, list(cfg.feature_pairs.values()), "teacher")

    def remove_hooks(self) -> None:
        for rec in (self._student_rec, self._teacher_rec):
            if rec is not None:
                rec.remove()
        self._student_rec = self._teacher_rec = None

    def _check_tokenizers(self) -> None:
        tt, st = self.teacher_tokenizer, self.student_tokenizer
        if tt is None or st is None or not hasattr(tt, "get_vocab") or not hasattr(st, "get_vocab"):
            return
        tv, sv = tt.get_vocab(), st.get_vocab()
        if tv == sv:
            return
        differing = len(set(tv.items()) ^ set(sv.items()))
        if self.task in _SEQUENCE_LEVEL_TASKS and all(k in ("embedding", "logits") for k in self.config.kinds.values()) \
                and not self.config.feature_pairs:
            # Sequence-level targets do not need aligned tokens: decode the student's text and re-tokenise it.
            self.retokenize = True
            return
        raise ValueError(
            f"Teacher and student tokenizers differ ({len(tv)} vs {len(sv)} tokens, {differing} entries differ). "
            "Token-level distillation (logits per token, hidden states, attention maps) needs the same tokenizer: "
            "use a teacher/student pair that shares one, or distil sequence-level targets only (pooled embeddings "
            "or sequence-classification logits, for which the text is re-tokenised for the teacher)."
        )

    def _check_vocab(self, student: nn.Module) -> None:
        if not any(k == "logits" for k in self.config.kinds.values()):
            return
        s_cfg, t_cfg = getattr(student, "config", None), getattr(self.teacher, "config", None)
        key = "num_labels" if self.task in ("seq_classification", "token_classification") else "vocab_size"
        sv, tv = getattr(s_cfg, key, None), getattr(t_cfg, key, None)
        if sv is None or tv is None or sv == tv:
            return
        if key == "num_labels":
            raise ValueError(f"Student has {sv} labels but the teacher has {tv}; logit distillation needs the same "
                             "label set (same order). Re-head the student or map the classes first.")
        if self.config.vocab_alignment == "error":
            raise ValueError(
                f"Student vocab_size {sv} differs from teacher vocab_size {tv}. If they share a tokenizer and only "
                "the embedding matrices are padded differently, set DistillationConfig(vocab_alignment='truncate') "
                "(compare the shared first min(V) entries) or 'pad'; if the tokenizers differ, logit distillation "
                "is not defined token by token."
            )

    # --------------------------------------------------------------- teacher
    def teacher_forward(self, inputs: dict, *, need_attentions: bool = False, extra: dict | None = None) -> Any:
        """Run the frozen teacher on the student's batch (no grad, eval mode re-asserted)."""
        self.teacher.eval()
        params = inspect.signature(self.teacher.forward).parameters
        accepts_kwargs = any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params.values())
        drop = {"labels", "num_items_in_batch", "return_loss", "shift_labels"}
        if self.task == "seq2seq":
            drop.discard("labels")  # the decoder inputs are derived from the labels
        tin = {}
        if self.retokenize:
            texts = self.student_tokenizer.batch_decode(inputs["input_ids"], skip_special_tokens=True)
            enc = self.teacher_tokenizer(texts, padding=True, truncation=True, return_tensors="pt",
                                         max_length=getattr(self.teacher_tokenizer, "model_max_length", 512))
            tin = dict(enc)
        else:
            for k, v in inputs.items():
                if k in drop or (k not in params and not accepts_kwargs):
                    continue
                tin[k] = v
        tin = {k: v.to(self.teacher_device) if torch.is_tensor(v) else v for k, v in tin.items()}
        if need_attentions:
            tin["output_attentions"] = True
        if extra:
            tin.update(extra)
        with torch.no_grad():
            out = self.teacher(**tin)
        if self.retokenize:
            out["_kd_attention_mask"] = tin.get("attention_mask")
        return out

    # ------------------------------------------------------------- projector
    def _projector(self, key: str, s_dim: int, t_dim: int, device, dtype=torch.float32) -> nn.Module | None:
        if s_dim == t_dim:
            return None
        if not self.config.feature_projector:
            raise ValueError(f"Feature widths differ for {key} (student {s_dim}, teacher {t_dim}) and "
                             "feature_projector=False; enable the projector or pick layers of equal width.")
        safe = key.replace(".", "__")
        if safe not in self.projectors:
            self.projectors[safe] = FeatureProjector(s_dim, t_dim).to(device)
            if self._pending_state is not None:
                self._load_projector_state(safe)
            self._build_projector_optimizer()
        return self.projectors[safe]

    def _build_projector_optimizer(self) -> None:
        params = [p for p in self.projectors.parameters()]
        if not params:
            return
        lr = self.config.projector_lr or 1e-3
        old = self.projector_optimizer
        self.projector_optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        if self._pending_state is not None and self._pending_state.get("optimizer") is not None and \
                len(params) == self._pending_state.get("n_params"):
            self._load_optimizer_state()
        del old

    def projector_step(self, lr: float | None = None, grad_scale: float | None = None) -> None:
        """All-reduce projector grads across ranks (they are outside DDP), step and zero them."""
        opt = self.projector_optimizer
        if opt is None:
            return
        params = [p for p in self.projectors.parameters() if p.grad is not None]
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
                g["lr"] = self.config.projector_lr if self.config.projector_lr else lr
        opt.step()
        opt.zero_grad(set_to_none=True)

    # ------------------------------------------------------------ the loss
    def compute(self, inputs: dict, student_outputs: Any, *, num_items_in_batch=None,
                normalize_by_items: bool = False, items_scale: float = 1.0, mean_scale: float = 1.0,
                teacher_outputs: Any = None, kinds: set[str] | None = None) -> KDResult:
        """Distillation terms for one batch.

        ``normalize_by_items``: token-level logit terms are summed and divided by ``num_items_in_batch`` (times
        ``items_scale``), matching a task loss normalised over the whole accumulated batch; otherwise they are
        means over this batch's valid rows. Mean-type terms (embeddings, hidden states, attention) are multiplied by
        ``mean_scale`` (the integration passes ``1 / grad_accum_steps`` when the task loss is normalised by items).
        ``kinds`` restricts the computed terms to those loss kinds (e.g. ``{"hidden"}`` beside a fused logit loss).
        """
        cfg = self.config
        if self.task is None:
            raise RuntimeError("DistillationEngine.setup(student) must be called before compute()")
        need_attn = any(k == "attention" for k in cfg.kinds.values()) and (kinds is None or "attention" in kinds)
        t_out = teacher_outputs if teacher_outputs is not None else self.teacher_forward(inputs,
                                                                                          need_attentions=need_attn)
        labels = inputs.get("labels")
        attn_mask = inputs.get("attention_mask")
        result = KDResult(loss=None)  # type: ignore[arg-type]
        total = None

        def add(name, value_for_loss, value_for_log):
            nonlocal total
            w = cfg.loss_terms[name]
            if not torch.isfinite(value_for_loss.detach()).all():
                raise FloatingPointError(
                    f"Non-finite distillation loss at step {self.step}: term {name!r} = "
                    f"{float(value_for_loss.detach())}. Check for -inf teacher logits (vocab_alignment='pad' gives "
                    "the teacher's extra tokens no student mass), fp16 overflow (use bf16), or a too-low temperature."
                )
            result.terms[name] = value_for_log.detach()
            total = value_for_loss * w if total is None else total + value_for_loss * w

        logit_terms = [n for n, k in cfg.kinds.items() if k == "logits" and (kinds is None or k in kinds)]
        if logit_terms:
            s_logits, t_logits, rows_labels, rows_mask = self._aligned_logits(student_outputs, t_out, labels,
                                                                              attn_mask)
            use_items = normalize_by_items and num_items_in_batch is not None and rows_labels is not None
            for name in logit_terms:
                loss_mod = self.losses[name]
                kw = dict(labels=rows_labels, mask=rows_mask)
                summed = _call_sum(loss_mod, s_logits, t_logits, **kw)
                count = _count_rows(s_logits, rows_labels, rows_mask)
                mean = summed / max(count, 1)
                val = summed / num_items_in_batch * items_scale if use_items else mean * mean_scale
                add(name, val, mean)
            if cfg.log_agreement and s_logits.numel():
                valid = torch.ones(s_logits.shape[:-1], dtype=torch.bool, device=s_logits.device)
                if rows_labels is not None:
                    valid &= rows_labels.to(valid.device) != IGNORE_INDEX
                if rows_mask is not None:
                    valid &= rows_mask.to(valid.device).bool()
                agree = (s_logits.argmax(-1) == t_logits.argmax(-1).to(s_logits.device))[valid]
                if agree.numel():
                    result.metrics["agreement"] = float(agree.float().mean())

        emb_terms = [n for n, k in cfg.kinds.items() if k == "embedding" and (kinds is None or k in kinds)]
        if emb_terms:
            s_emb = self._pool(student_outputs, attn_mask)
            t_mask = t_out.get("_kd_attention_mask") if isinstance(t_out, dict) and self.retokenize else attn_mask
            t_emb = self._pool(t_out, t_mask).to(s_emb.device)
            for name in emb_terms:
                mod = self.losses[name]
                proj = None
                if getattr(mod, "needs_width", True):
                    proj = self._projector(f"embedding.{name}", s_emb.shape[-1], t_emb.shape[-1], s_emb.device)
                se = proj(s_emb) if proj is not None else s_emb
                val = mod(se, t_emb)
                add(name, val * mean_scale, val)
            if cfg.log_agreement and s_emb.shape[-1] == t_emb.shape[-1]:
                result.metrics["teacher_cosine"] = float(F.cosine_similarity(s_emb.detach().float(),
                                                                             t_emb.float(), -1).mean())

        hid_terms = [n for n, k in cfg.kinds.items() if k == "hidden" and (kinds is None or k in kinds)]
        if hid_terms:
            feats = []
            for s_name, t_name in cfg.feature_pairs.items():
                sh, th = self._student_rec.pop(s_name), self._teacher_rec.pop(t_name).to(model_device(self.student))
                feats.append((s_name, sh, th))
            for name in hid_terms:
                vals = []
                for s_name, sh, th in feats:
                    proj = self._projector(f"{name}.{s_name}", sh.shape[-1], th.shape[-1], sh.device)
                    mask = attn_mask if (attn_mask is not None and sh.dim() == 3
                                         and sh.shape[:2] == attn_mask.shape) else None
                    fn = self.losses[name]
                    vals.append(type(fn)._fn(sh, th, mask=mask, projector=proj))
                val = torch.stack(vals).mean()
                add(name, val * mean_scale, val)

        attn_terms = [n for n, k in cfg.kinds.items() if k == "attention" and (kinds is None or k in kinds)]
        if attn_terms:
            s_att, t_att = getattr(student_outputs, "attentions", None), getattr(t_out, "attentions", None)
            if not s_att or not t_att:
                raise ValueError("Attention losses need attention maps: load both models with "
                                 "attn_implementation='eager' (SDPA/flash attention return no maps).")
            for name in attn_terms:
                vals = [self.losses[name](s_att[si], t_att[ti].to(s_att[si].device), attention_mask=attn_mask)
                        for si, ti in cfg.attention_layer_map.items()]
                val = torch.stack(vals).mean()
                add(name, val * mean_scale, val)

        result.loss = total if total is not None else torch.zeros((), device=model_device(self.student))
        return result

    def _pool(self, outputs: Any, attention_mask) -> torch.Tensor:
        hidden = outputs["last_hidden_state"] if isinstance(outputs, dict) and "last_hidden_state" in outputs \
            else getattr(outputs, "last_hidden_state", None)
        if hidden is None:
            raise ValueError("Embedding losses need last_hidden_state in the model outputs (a bare encoder such as "
                             "AutoModel); this model returned " + ", ".join(getattr(outputs, "keys", lambda: [])()))
        if self.config.pooling == "cls":
            return hidden[:, 0]
        return mean_pool(hidden, attention_mask.to(hidden.device) if attention_mask is not None else None)

    def _aligned_logits(self, s_out, t_out, labels, attn_mask):
        s = s_out["logits"] if isinstance(s_out, dict) else s_out[1]
        t = t_out["logits"].to(s.device)
        if s.shape[:-1] != t.shape[:-1]:
            raise ValueError(f"Student logits {tuple(s.shape)} and teacher logits {tuple(t.shape)} cover different "
                             "positions; both models must see the same tokens.")
        if s.shape[-1] != t.shape[-1]:
            s, t = self._align_vocab(s, t)
        mask = None
        if self.task == "causal_lm":
            s, t = s[:, :-1], t[:, :-1]
            if labels is not None:
                labels = labels[:, 1:]
            if attn_mask is not None:
                mask = attn_mask[:, 1:]
        elif s.dim() == 3 and attn_mask is not None and self.task != "seq2seq":
            mask = attn_mask
        if self.config.hard_label_weight > 0 and labels is None:
            raise ValueError("hard_label_weight > 0 but the batch has no labels; add labels (e.g. "
                             "DataCollatorForLanguageModeling(mlm=False)) or set hard_label_weight=0.")
        if "dkd" in self.losses and labels is None:
            raise ValueError("DKD needs labels (target classes) in the batch.")
        if self.task == "seq_classification":
            mask = None
            if labels is not None and labels.dim() != 1:  # multi-label / regression targets are not class ids
                labels = None
        return s, t, labels, mask

    def _align_vocab(self, s, t):
        mode = self.config.vocab_alignment
        vs, vt = s.shape[-1], t.shape[-1]
        if mode == "error":
            raise ValueError(f"Student logits have {vs} entries per row, teacher logits {vt}. Set "
                             "DistillationConfig(vocab_alignment='truncate' or 'pad') when the tokenizers are the "
                             "same and only the padded vocabulary sizes differ.")
        if mode == "truncate":
            v = min(vs, vt)
            return s[..., :v], t[..., :v]
        v = max(vs, vt)
        pad = lambda x: F.pad(x, (0, v - x.shape[-1]), value=float("-inf"))  # noqa: E731
        return pad(s), pad(t)

    # ------------------------------------------------------------- state
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Projector weights and their optimizer state, flattened for safetensors."""
        out = {f"projectors.{k}": v.detach().cpu().contiguous() for k, v in self.projectors.state_dict().items()}
        if self.projector_optimizer is not None:
            st = self.projector_optimizer.state_dict()
            for pid, s in st["state"].items():
                for k, v in s.items():
                    t = v if torch.is_tensor(v) else torch.tensor(v)
                    out[f"optimizer.{pid}.{k}"] = t.detach().cpu().reshape(t.shape).contiguous()
        return out

    def save(self, directory: str) -> str | None:
        """Write projector (+ optimizer) state beside a checkpoint, atomically. Returns the path or None."""
        if not len(self.projectors):
            return None
        from safetensors.torch import save_file

        meta = {"format": "kd_plugins", "n_params": str(len(list(self.projectors.parameters()))),
                "projectors": json.dumps(sorted(self.projectors.keys()))}
        path = os.path.join(directory, STATE_FILE)
        tmp = path + ".tmp"
        save_file(self.state_dict(), tmp, metadata=meta)
        os.replace(tmp, path)
        return path

    def load(self, directory: str) -> bool:
        """Queue projector state from ``directory`` (applied when each projector is created). Returns found."""
        path = os.path.join(directory, STATE_FILE)
        if not os.path.exists(path):
            return False
        from safetensors import safe_open

        tensors = {}
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            for k in f.keys():
                tensors[k] = f.get_tensor(k)
        if meta.get("format") != "kd_plugins":
            raise ValueError(f"{path} is not a kd_plugins state file")
        opt = {k[len("optimizer."):]: v for k, v in tensors.items() if k.startswith("optimizer.")}
        self._pending_state = {"projectors": {k[len("projectors."):]: v for k, v in tensors.items()
                                              if k.startswith("projectors.")},
                               "optimizer": opt or None, "n_params": int(meta.get("n_params", 0))}
        for name in list(self.projectors.keys()):
            self._load_projector_state(name)
        if self.projectors:
            self._build_projector_optimizer()
        return True

    def _load_projector_state(self, name: str) -> None:
        sd = {k[len(name) + 1:]: v for k, v in self._pending_state["projectors"].items() if k.startswith(name + ".")}
        if sd:
            self.projectors[name].load_state_dict(sd)

    def _load_optimizer_state(self) -> None:
        opt = self.projector_optimizer
        flat = self._pending_state["optimizer"]
        state: dict[int, dict] = {}
        for key, v in flat.items():
            pid, name = key.split(".", 1)
            state.setdefault(int(pid), {})[name] = v
        sd = opt.state_dict()
        sd["state"] = state
        opt.load_state_dict(sd)


def _count_rows(logits, labels, mask) -> int:
    valid = torch.ones(logits.shape[:-1], dtype=torch.bool, device=logits.device)
    if labels is not None:
        valid &= labels.to(valid.device) != IGNORE_INDEX
    if mask is not None:
        valid &= mask.to(valid.device).bool()
    return int(valid.sum())


def _call_sum(loss_mod: nn.Module, s, t, **kw) -> torch.Tensor:
    """Call a registered logit loss with reduction='sum' (restoring its configured reduction)."""
    old = loss_mod.reduction
    loss_mod.reduction = "sum"
    try:
        return loss_mod(s, t, **kw)
    finally:
        loss_mod.reduction = old


__all__ = ["DistillationEngine", "KDResult", "FeatureRecorder", "detect_task", "unwrap_model", "STATE_FILE"]
