#!/usr/bin/env python3
"""Distillation training for timm models: ``kd-plugins-timm-train`` / ``python -m kd_plugins.integrations.timm.train``.

Built from timm's own library parts (``create_model``, ``create_dataset``/``create_loader``, ``Mixup``,
``create_optimizer_v2``, ``create_scheduler_v2``, ``CheckpointSaver``, task EMA, ``resume_task_checkpoint``) around
:class:`kd_plugins.integrations.timm.KDTask`. It accepts most of timm's ``train.py`` flags with timm's names, defaults
and derivations (``-c`` YAML defaults, ``--lr`` from ``--lr-base``, ``--input-img-mode`` ``L`` for one channel,
``--img-size`` for the data only; see :mod:`kd_plugins.integrations.timm.train_args` and ``docs/timm.md``) plus
``--kd-*`` flags named like timm's::

    python -m kd_plugins.integrations.timm.train /data/imagenette --model resnet18 --num-classes 10 \\
        --kd-model-name resnet50 --kd-teacher-checkpoint teacher.pth.tar \\
        --kd-loss kl:1.0,hidden_mse:0.5 --kd-feature-pairs 3=3,4=4 --kd-temperature 4 --distill-loss-weight 1

Distributed: ``torchrun --nproc_per_node N -m kd_plugins.integrations.timm.train ...`` (only the student and the
distillation modules are wrapped in DDP). Checkpoints hold the plain student ``state_dict`` (loadable with
``timm.create_model(model, num_classes=...)``) and the projectors/branches under ``task_state``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from typing import Any

import torch
import torch.nn as nn

from .train_args import ParseKwargs, build_parser, parse_args, parse_args_and_text, resolve_input_img_mode, resolve_lr

__all__ = ["main", "cli", "build_parser", "parse_args", "parse_args_and_text", "ParseKwargs", "resolve_lr"]

_logger = logging.getLogger("kd_plugins.timm.train")


def _stages(text):
    if text is None or str(text).lower() in ("none", "", "0"):
        return None
    if str(text).lower() == "auto":
        return "auto"
    from ...vision.features import parse_spec

    return [parse_spec(t) for t in str(text).split(",") if t.strip()]


@dataclass
class _Run:
    """What the epoch loop works with (built by :func:`main`)."""

    task: Any
    optimizer: Any
    loader_train: Any
    loader_eval: Any
    device: torch.device
    amp_autocast: Callable
    loss_scaler: Any = None
    mixup_fn: Any = None
    saver: Any = None
    output_dir: str | None = None


def main(argv=None) -> dict:
    """Train (and distil) as configured by the command line ``argv``; returns the best metric and epoch, the output
    folder, the last evaluation and the exported exits."""
    import timm.utils as tutils

    tutils.setup_default_logging()
    args, args_text = parse_args_and_text(argv)
    args.prefetcher = not args.no_prefetcher
    args.grad_accum_steps = max(1, args.grad_accum_steps)
    device = tutils.init_distributed_device(args)
    primary = tutils.is_primary(args)
    tutils.random_seed(args.seed, args.rank)

    model, data_config, create_kwargs = _build_student(args, device, primary)
    task = _build_task(args, model, data_config, create_kwargs, device, primary)
    mixup_args = _set_criterion(args, task)
    loader_train, loader_eval, mixup_fn = _build_loaders(args, data_config, device, mixup_args)
    resolve_lr(args, world_size=args.world_size, verbose=primary)
    amp_autocast, loss_scaler = _setup_amp(args, device, primary)
    optimizer, resume_epoch = _prepare_task(args, task, device, primary, loss_scaler)
    run = _Run(task, optimizer, loader_train, loader_eval, device, amp_autocast, loss_scaler, mixup_fn)
    if primary:
        run.saver, run.output_dir = _make_saver(args, args_text, run, data_config)
    start_epoch = args.start_epoch if args.start_epoch is not None else (resume_epoch or 0)
    best_metric, best_epoch, eval_metrics = _run_epochs(args, run, start_epoch)
    if primary and best_metric is not None:
        _logger.info(f"*** Best metric: {best_metric} (epoch {best_epoch})")
    exports = {}
    if args.exit_layers and args.exit_export and run.output_dir is not None:
        exports = _export_exits(task.model, args.model, run.output_dir)
    if args.distributed:
        torch.distributed.barrier()
    return {
        "best_metric": best_metric,
        "best_epoch": best_epoch,
        "output_dir": run.output_dir,
        "eval": eval_metrics,
        "exit_exports": exports,
    }


def _in_chans(args) -> int:
    """timm's rule: ``--in-chans``, else the first ``--input-size`` entry, else 3."""
    if args.in_chans is not None:
        return args.in_chans
    return args.input_size[0] if args.input_size is not None else 3


def _build_student(args, device, primary):
    """The student on ``device``, its resolved data config and its ``create_model`` kwargs (for exit exports).
    As in timm's ``train.py``, ``--img-size`` / ``--input-size`` size the data pipeline only; the model is built
    at the size ``--model-kwargs`` gives (its default otherwise)."""
    from timm.data import resolve_data_config

    from ...vision.models import create_timm_model, load_checkpoint_strict

    kw = dict(
        num_classes=args.num_classes,
        in_chans=_in_chans(args),
        drop_rate=args.drop,
        drop_path_rate=args.drop_path,
        drop_block_rate=args.drop_block,
        global_pool=args.gp,
        bn_momentum=args.bn_momentum,
        bn_eps=args.bn_eps,
    )
    kw.update(args.model_kwargs)
    model = create_timm_model(args.model, **{k: v for k, v in kw.items() if v is not None})
    if args.initial_checkpoint:
        load_checkpoint_strict(model, args.initial_checkpoint, role="student")
    _init_head(model, args.head_init_scale, args.head_init_bias)
    if args.num_classes is None:
        args.num_classes = model.num_classes
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)
    data_config = resolve_data_config(vars(args), model=model, verbose=primary)
    _check_model_input_size(model, args.model, data_config["input_size"])
    model.to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    training_only = ("drop_rate", "drop_path_rate", "drop_block_rate")
    create_kwargs = {k: v for k, v in kw.items() if v is not None and k not in training_only}
    return model, data_config, create_kwargs


def _init_head(model, scale, bias) -> None:
    """``--head-init-scale`` / ``--head-init-bias`` on the classifier, as timm's ``train.py`` applies them."""
    if scale is not None:
        with torch.no_grad():
            model.get_classifier().weight.mul_(scale)
            model.get_classifier().bias.mul_(scale)
    if bias is not None:
        nn.init.constant_(model.get_classifier().bias, bias)


def _check_model_input_size(model, name, input_size) -> None:
    """A model with a fixed input size (ViT-style patch embedding) that the data pipeline does not match fails in
    its first forward with a bare assertion; say here what to pass instead."""
    embed = getattr(model, "patch_embed", None)
    fixed = getattr(embed, "img_size", None)
    if fixed is None or not getattr(embed, "strict_img_size", False) or getattr(model, "dynamic_img_size", False):
        return
    if tuple(fixed) != tuple(input_size[-2:]):
        h, w = input_size[-2:]
        raise ValueError(
            f"{name} is built for {fixed[0]}x{fixed[1]} inputs but the data pipeline gives {h}x{w}. As in timm's "
            "train.py, --model-kwargs img_size=N sizes the model and --img-size N (or --input-size C N N) the data: "
            f"give both (e.g. --model-kwargs img_size={fixed[0]} --img-size {fixed[0]}, or img_size={h} for {h}x{w} "
            "images)."
        )


def _build_task(args, model, data_config, create_kwargs, device, primary):
    """``MultiExitTask`` (``--exit-layers``), ``ProCKDTask`` (``--kd-method prockd``), ``KDTask``
    (``--kd-model-name``) or timm's ``ClassificationTask``."""
    from .task import KDTask

    several = len(_names(args.kd_model_name)) > 1
    set_flags = [
        flag
        for flag, given in (
            ("--kd-teacher-weights", args.kd_teacher_weights),
            ("--kd-teacher-aggregation", args.kd_teacher_aggregation != "mixture"),
            ("--kd-teacher-offload", args.kd_teacher_offload),
        )
        if given
    ]
    if set_flags and not several:
        raise SystemExit(
            f"{', '.join(set_flags)} apply to several teachers: give them as comma-separated --kd-model-name and "
            "--kd-teacher-checkpoint, or drop the flag"
        )
    if several and (args.exit_layers or args.kd_method == "prockd"):
        raise SystemExit(
            "several teachers (comma-separated --kd-model-name) apply to --kd-method kd only, not to "
            "--exit-layers or --kd-method prockd; give one teacher"
        )
    if args.kd_method == "prockd" and (args.exit_layers or not args.kd_model_name or args.kd_feature_pairs):
        raise SystemExit(
            "--kd-method prockd needs --kd-model-name (the teacher) and takes neither --exit-layers nor "
            "--kd-feature-pairs (ProC-KD reads the last feature map of both models)"
        )
    if args.exit_layers:
        task = _multi_exit_task(args, model, create_kwargs, device, primary)
    elif args.kd_method == "prockd":
        from .proc_kd import ProCKDTask

        task = ProCKDTask(
            student_model=model,
            teacher_model=args.kd_model_name,
            teacher_checkpoint=args.kd_teacher_checkpoint,
            teacher_kwargs=_teacher_kwargs(args, create_kwargs),
            num_prototypes=args.kd_prockd_prototypes,
            student_feature=_prockd_features(args)[0],
            teacher_feature=_prockd_features(args)[1],
            distill_loss_weight=args.distill_loss_weight,
            task_loss_weight=args.task_loss_weight,
            teacher_input_size=args.kd_teacher_input_size,
            input_size=data_config["input_size"],
            device=device,
            verbose=primary,
            **_kd_normalization(args, data_config),
        )
    elif args.kd_model_name:
        normalization = _kd_normalization(args, data_config)
        teacher, checkpoint = args.kd_model_name, args.kd_teacher_checkpoint
        if several:
            teacher, checkpoint = _teacher_set(args, create_kwargs, normalization), None
        task = KDTask(
            student_model=model,
            teacher_model=teacher,
            teacher_checkpoint=checkpoint,
            teacher_kwargs=_teacher_kwargs(args, create_kwargs),
            loss_terms=args.kd_loss,
            loss_kwargs=args.kd_loss_kwargs,
            temperature=args.kd_temperature,
            feature_pairs=args.kd_feature_pairs,
            feature_loss=args.kd_feature_loss,
            feature_weight=args.kd_feature_weight,
            feature_align=args.kd_feature_align,
            ofa_stages=_stages(args.kd_ofa_stages),
            ofa_branch_weight=args.kd_ofa_branch_weight,
            patch_embed_weight=args.kd_patch_embed_weight,
            distill_loss_weight=args.distill_loss_weight,
            task_loss_weight=args.task_loss_weight,
            criterion_kwargs=None,
            teacher_input_size=args.kd_teacher_input_size,
            input_size=data_config["input_size"],
            device=device,
            verbose=primary,
            **normalization,
        )
    else:
        from timm.task import ClassificationTask

        task = ClassificationTask(model, device=device, verbose=primary)
    task.to(device)
    return task


def _names(value: str | None) -> list[str]:
    return [t.strip() for t in str(value or "").split(",") if t.strip()]


def _teacher_set(args, create_kwargs, normalization: dict):
    """A ``TeacherSet`` of the comma-separated ``--kd-model-name`` teachers, each loaded from its
    ``--kd-teacher-checkpoint``. ``normalization`` loses its teacher mean/std: each member's adapted mean/std goes
    into its own ``pretrained_cfg`` (one value for all would be wrong for teachers trained differently)."""
    from ...distill.teacher_set import TeacherSet
    from ...vision.models import create_timm_model, load_checkpoint_strict

    names, checkpoints = _names(args.kd_model_name), _names(args.kd_teacher_checkpoint)
    if len(checkpoints) != len(names):
        raise SystemExit(
            f"--kd-model-name names {len(names)} teachers but --kd-teacher-checkpoint gives {len(checkpoints)} "
            "checkpoints; give one trained checkpoint per teacher, comma-separated in the same order "
            "(kd_plugins never downloads weights)"
        )
    chans = create_kwargs.get("in_chans", 3)
    normalization.pop("teacher_mean", None)
    normalization.pop("teacher_std", None)
    teachers = {}
    for i, (name, path) in enumerate(zip(names, checkpoints)):
        model = create_timm_model(name, **_teacher_kwargs(args, create_kwargs))
        load_checkpoint_strict(model, path, role=f"teacher {i} ({name})")
        if chans != 3:  # as for one teacher: its mean/std averaged to the channel count
            mean, std = _teacher_norm(name, chans)
            model.pretrained_cfg = {**(getattr(model, "pretrained_cfg", None) or {}), "mean": mean, "std": std}
        teachers[f"{i}:{name}"] = model
    weights = [float(w) for w in _names(args.kd_teacher_weights)] or None
    return TeacherSet(teachers, weights, aggregation=args.kd_teacher_aggregation, offload=args.kd_teacher_offload)


def _prockd_features(args) -> tuple[str, str]:
    student, sep, teacher = args.kd_prockd_features.partition("=")
    if not sep or not student.strip() or not teacher.strip():
        raise SystemExit(f"--kd-prockd-features takes STUDENT=TEACHER (e.g. '-1=-1'), got {args.kd_prockd_features!r}")
    return student.strip(), teacher.strip()


def _teacher_kwargs(args, create_kwargs) -> dict:
    """``create_model`` kwargs of the teacher: the student's input channels, ``--kd-model-kwargs`` and
    ``--kd-teacher-num-classes`` (the student's class count otherwise)."""
    kw = {"in_chans": create_kwargs.get("in_chans", 3), **args.kd_model_kwargs}
    kw["num_classes"] = args.kd_teacher_num_classes or args.num_classes
    return kw


def _kd_normalization(args, data_config) -> dict:
    """The student's mean/std (the loaders' normalisation) to re-normalise its batch for the teacher. With other
    than 3 input channels, both models' 3-value mean/std are averaged to the channel count, as timm's loaders do,
    so that the teacher's input keeps its channels (for RGB ``KDTask`` reads the teacher's from its config)."""
    from timm.data.loader import adapt_to_chs

    chans = data_config["input_size"][0]
    if chans == 3:
        return {"student_mean": data_config["mean"], "student_std": data_config["std"]}
    t_mean, t_std = _teacher_norm(_names(args.kd_model_name)[0], chans)
    return {
        "student_mean": adapt_to_chs(data_config["mean"], chans),
        "student_std": adapt_to_chs(data_config["std"], chans),
        "teacher_mean": t_mean,
        "teacher_std": t_std,
    }


def _teacher_norm(name: str, chans: int) -> tuple[tuple, tuple]:
    """Teacher ``name``'s mean/std from timm's registry (ImageNet's when absent) averaged to ``chans`` channels."""
    from timm.data.loader import adapt_to_chs
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    mean = getattr(cfg, "mean", None) or (0.485, 0.456, 0.406)
    std = getattr(cfg, "std", None) or (0.229, 0.224, 0.225)
    return adapt_to_chs(mean, chans), adapt_to_chs(std, chans)


def _set_criterion(args, task) -> dict | None:
    """The task loss as in timm's train.py (Mixup/CutMix soft targets or label smoothing); returns the Mixup
    arguments (``None`` without Mixup/CutMix)."""
    mixup_active = args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None
    if mixup_active:
        from timm.loss import SoftTargetCrossEntropy

        task.criterion = SoftTargetCrossEntropy()
        return dict(
            mixup_alpha=args.mixup,
            cutmix_alpha=args.cutmix,
            cutmix_minmax=args.cutmix_minmax,
            prob=args.mixup_prob,
            switch_prob=args.mixup_switch_prob,
            mode=args.mixup_mode,
            label_smoothing=args.smoothing,
            num_classes=args.num_classes,
        )
    if args.smoothing:
        from timm.loss import LabelSmoothingCrossEntropy

        task.criterion = LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    else:
        task.criterion = nn.CrossEntropyLoss()
    return None


def _setup_amp(args, device, primary):
    """The autocast context (``--amp``, ``--amp-dtype``) and, for float16 on CUDA, timm's loss scaler."""
    if not args.amp:
        return nullcontext, None
    from timm.utils import NativeScaler

    amp_dtype = getattr(torch, args.amp_dtype)
    loss_scaler = NativeScaler(device=device.type) if device.type == "cuda" and amp_dtype == torch.float16 else None
    if primary:
        _logger.info(f"Using native Torch AMP ({args.amp_dtype}). Training in mixed precision.")
    return partial(torch.autocast, device_type=device.type, dtype=amp_dtype), loss_scaler


def _prepare_task(args, task, device, primary, loss_scaler):
    """Optimizer over the trainable module, then resume, EMA, ``torch.compile`` and DDP (in timm's order).
    Returns the optimizer and the resumed epoch (``None`` without ``--resume``)."""
    from timm.optim import create_optimizer_v2, optimizer_kwargs
    from timm.task import load_task_ema_checkpoint, resume_task_checkpoint

    optimizer = create_optimizer_v2(task.get_trainable_module(), **optimizer_kwargs(cfg=args), **args.opt_kwargs)
    resume_epoch = None
    if args.resume:
        resume_epoch = resume_task_checkpoint(
            task,
            args.resume,
            optimizer=None if args.no_resume_opt else optimizer,
            loss_scaler=None if args.no_resume_opt else loss_scaler,
            log_info=primary,
        )
    if args.model_ema:
        task.setup_ema(decay=args.model_ema_decay, use_warmup=args.model_ema_warmup)
        if args.resume:
            load_task_ema_checkpoint(task, args.resume)
    if args.torchcompile:
        task.compile(backend=args.torchcompile, mode=args.torchcompile_mode)
        if task.has_ema():
            task.compile_ema(backend=args.torchcompile, mode=args.torchcompile_mode)
    if args.distributed:
        task.prepare_distributed(device_ids=[device] if device.type == "cuda" else None)
    return optimizer, resume_epoch


def _build_loaders(args, data_config, device, mixup_args):
    """timm train/eval datasets and loaders (augmentation from the flags, normalisation from ``data_config``).
    Returns both loaders and the Mixup function (``None`` without Mixup, or when the prefetcher's collate mixes,
    as in timm)."""
    from timm.data import FastCollateMixup, Mixup, create_loader
    from timm.data.loader import adapt_to_chs

    img_mode = resolve_input_img_mode(args, data_config)
    datasets = [_create_dataset(args, split, img_mode) for split in (args.train_split, args.val_split)]
    chans = data_config["input_size"][0]
    common = dict(
        input_size=data_config["input_size"],
        use_prefetcher=args.prefetcher,
        mean=adapt_to_chs(data_config["mean"], chans),  # the prefetcher adapts 3-value stats; the transforms do not
        std=adapt_to_chs(data_config["std"], chans),
        num_workers=args.workers,
        distributed=args.distributed,
        pin_memory=args.pin_mem,
        device=device,
    )
    collate_fn, mixup_fn = None, None
    if mixup_args:
        if args.prefetcher:
            collate_fn = FastCollateMixup(**mixup_args)
        else:
            mixup_fn = Mixup(**mixup_args)
    loader_train = create_loader(
        datasets[0],
        batch_size=args.batch_size,
        is_training=True,
        collate_fn=collate_fn,
        **_train_augmentation(args, data_config),
        **common,
    )
    loader_eval = create_loader(
        datasets[1],
        batch_size=args.validation_batch_size or args.batch_size,
        is_training=False,
        interpolation=data_config["interpolation"],
        crop_pct=data_config["crop_pct"],
        **common,
    )
    return loader_train, loader_eval, mixup_fn


def _create_dataset(args, split, img_mode):
    from timm.data import create_dataset

    training = split == args.train_split
    return create_dataset(
        args.dataset,
        root=args.data_dir,
        split=split,
        is_training=training,
        class_map=args.class_map,
        download=args.dataset_download,
        batch_size=args.batch_size,
        seed=args.seed,
        repeats=args.epoch_repeats if training else 0,
        input_img_mode=img_mode,
        input_key=args.input_key,
        target_key=args.target_key,
        num_samples=args.train_num_samples if training else args.val_num_samples,
        trust_remote_code=args.dataset_trust_remote_code,
    )


def _train_augmentation(args, data_config) -> dict:
    """``create_loader`` augmentation kwargs of the train loader, from timm's flags."""
    interpolation = args.train_interpolation
    if args.no_aug or not interpolation:
        interpolation = data_config["interpolation"]
    return dict(
        no_aug=args.no_aug,
        re_prob=args.reprob,
        re_mode=args.remode,
        re_count=args.recount,
        train_crop_mode=args.train_crop_mode,
        scale=args.scale,
        ratio=args.ratio,
        hflip=args.hflip,
        vflip=args.vflip,
        color_jitter=args.color_jitter,
        color_jitter_prob=args.color_jitter_prob,
        grayscale_prob=args.grayscale_prob,
        gaussian_blur_prob=args.gaussian_blur_prob,
        auto_augment=args.aa,
        interpolation=interpolation,
        worker_seeding=args.worker_seeding,
    )


def _make_saver(args, args_text, run, data_config):
    """The output folder (with ``args.yaml`` as timm writes it, and ``args.json``) and timm's ``CheckpointSaver``
    over the task (primary rank only)."""
    import timm.utils as tutils

    exp = args.experiment or "-".join(
        [
            datetime.now().strftime("%Y%m%d-%H%M%S"),
            tutils.safe_model_name(args.model) if hasattr(tutils, "safe_model_name") else args.model,
            str(data_config["input_size"][-1]),
        ]
    )
    output_dir = tutils.get_outdir(args.output or "./output/train", exp)
    saver = tutils.CheckpointSaver(
        model=run.task.get_eval_model(),
        optimizer=run.optimizer,
        args=args,
        amp_scaler=run.loss_scaler,
        task=run.task,
        checkpoint_dir=output_dir,
        recovery_dir=output_dir,
        decreasing=args.eval_metric == "loss",
        max_history=args.checkpoint_hist,
    )
    with open(os.path.join(output_dir, "args.yaml"), "w") as f:
        f.write(args_text)
    with open(os.path.join(output_dir, "args.json"), "w") as f:
        json.dump(
            {k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool, list, dict, type(None)))},
            f,
            indent=1,
        )
    return saver, output_dir


def _run_epochs(args, run: _Run, start_epoch: int):
    """The LR schedule and the epoch loop (train, sync BN, validate, log, checkpoint); returns the best metric,
    its epoch and the last evaluation."""
    import timm.utils as tutils
    from timm.scheduler import create_scheduler_v2, scheduler_kwargs

    task, optimizer = run.task, run.optimizer
    updates_per_epoch = (len(run.loader_train) + args.grad_accum_steps - 1) // args.grad_accum_steps
    lr_scheduler, num_epochs = create_scheduler_v2(
        optimizer,
        **scheduler_kwargs(args, decreasing_metric=args.eval_metric == "loss"),
        updates_per_epoch=updates_per_epoch,
    )
    if lr_scheduler is not None and start_epoch > 0:
        if args.sched_on_updates:
            lr_scheduler.step_update(start_epoch * updates_per_epoch)
        else:
            lr_scheduler.step(start_epoch)
    best_metric, best_epoch, eval_metrics, num_updates = None, None, {}, start_epoch * updates_per_epoch
    for epoch in range(start_epoch, num_epochs):
        if args.distributed and hasattr(run.loader_train.sampler, "set_epoch"):
            run.loader_train.sampler.set_epoch(epoch)
        train_metrics, num_updates = train_one_epoch(epoch, run, args, lr_scheduler, num_updates)
        if args.distributed and args.dist_bn in ("broadcast", "reduce"):
            tutils.distribute_bn(task.get_eval_model(), args.world_size, args.dist_bn == "reduce")
        eval_metrics = validate(task.get_eval_model(), run.loader_eval, args, run.device, run.amp_autocast)
        if task.has_ema():
            eval_metrics = validate(task.get_eval_model(ema=True), run.loader_eval, args, run.device, run.amp_autocast)
        if run.output_dir is not None:
            tutils.update_summary(
                epoch,
                train_metrics,
                eval_metrics,
                filename=os.path.join(run.output_dir, "summary.csv"),
                lr=optimizer.param_groups[0]["lr"],
                write_header=best_metric is None,
            )
        if run.saver is not None:
            best_metric, best_epoch = run.saver.save_checkpoint(epoch, metric=eval_metrics[args.eval_metric])
        if lr_scheduler is not None:
            lr_scheduler.step(epoch + 1, eval_metrics[args.eval_metric])
    return best_metric, best_epoch, eval_metrics


def _multi_exit_task(args, model, create_kwargs, device, primary):
    """``MultiExitTask`` for ``--exit-layers``: exits on the student, optional frozen teacher from ``--kd-*``."""
    from ...multiexit import MultiExitConfig, add_exits
    from ...vision.models import create_timm_model, load_checkpoint_strict
    from .multiexit import MultiExitTask

    layers = [int(t) for t in str(args.exit_layers).split(",") if t.strip()]
    weights = args.exit_weights
    if weights not in ("depth", "uniform"):
        weights = [float(t) for t in str(weights).split(",")]
    add_exits(model, layers=layers, head=args.exit_head, create_kwargs=create_kwargs)
    model.to(device)
    teacher = None
    if args.kd_model_name:
        if not args.kd_teacher_checkpoint:
            raise ValueError(
                f"--kd-model-name {args.kd_model_name} needs --kd-teacher-checkpoint (a trained "
                "checkpoint for that architecture); kd_plugins never downloads weights"
            )
        teacher = create_timm_model(args.kd_model_name, **_teacher_kwargs(args, create_kwargs))
        load_checkpoint_strict(teacher, args.kd_teacher_checkpoint, role="teacher")
        teacher.to(device)
    cfg = MultiExitConfig(
        weights=weights,
        self_distill_weight=args.exit_self_distill_weight,
        teacher_weight=1.0 if args.distill_loss_weight is None else args.distill_loss_weight,
        task_weight=1.0 if args.task_loss_weight is None else args.task_loss_weight,
        temperature=args.exit_temperature,
    )
    return MultiExitTask(model, config=cfg, teacher=teacher, device=device, verbose=primary)


def _export_exits(model, name, output_dir) -> dict:
    """Each exit as a standalone truncated timm model, written atomically to ``OUTPUT/exits/``:
    ``exit{k}.safetensors`` and ``exit{k}.json`` (``{"model": name, "create_kwargs": {...}}``), so that
    ``timm.create_model(name, **create_kwargs).load_state_dict(load_file(...))`` rebuilds it."""
    from safetensors.torch import save_file

    from ..._checkpoint import atomic_dir
    from ...multiexit import get_exits, truncate

    final = os.path.join(output_dir, "exits")
    out = {}
    with atomic_dir(final) as tmp:
        for k in get_exits(model).layers:
            small = truncate(model, k)
            save_file(
                {n: t.detach().cpu().contiguous() for n, t in small.state_dict().items()},
                str(tmp / f"exit{k}.safetensors"),
            )
            with open(tmp / f"exit{k}.json", "w") as f:
                json.dump({"model": name, "create_kwargs": small.kd_plugins_create_kwargs}, f, indent=1)
            out[k] = os.path.join(final, f"exit{k}.safetensors")
    return out


def train_one_epoch(epoch, run: _Run, args, lr_scheduler, num_updates):
    """One pass over the train loader (gradient accumulation, AMP loss scaling, clipping, EMA, per-update LR);
    returns the mean losses and the update count."""
    import timm.utils as tutils

    task, optimizer, loader = run.task, run.optimizer, run.loader_train
    _mixup_off(epoch, run, args)
    task.train()
    losses, kd_losses = tutils.AverageMeter(), tutils.AverageMeter()
    accum = args.grad_accum_steps
    optimizer.zero_grad()
    last_idx = len(loader) - 1
    t0 = time.time()
    for batch_idx, (input, target) in enumerate(loader):
        need_update = (batch_idx + 1) % accum == 0 or batch_idx == last_idx
        input, target = input.to(run.device), target.to(run.device)
        if run.mixup_fn is not None:
            input, target = run.mixup_fn(input, target)
        if args.channels_last:
            input = input.contiguous(memory_format=torch.channels_last)
        ctx = task.no_sync() if (args.distributed and not need_update) else nullcontext()
        with ctx:
            with run.amp_autocast():
                result = task(input, target)
            _backward_and_step(result["loss"] / accum, run, args, need_update)
        if need_update:
            optimizer.zero_grad()
            num_updates += 1
            task.update_ema(step=num_updates)
            if lr_scheduler is not None:
                lr_scheduler.step_update(num_updates=num_updates)
        losses.update(float(result["loss"].detach()), input.size(0))
        if "kd_loss" in result:
            kd_losses.update(float(result["kd_loss"].detach()), input.size(0))
        if tutils.is_primary(args) and (batch_idx % args.log_interval == 0 or batch_idx == last_idx):
            _logger.info(
                f"Train: {epoch} [{batch_idx:>4d}/{len(loader)}] loss {losses.val:.4f} ({losses.avg:.4f}) "
                f"kd {kd_losses.avg:.4f} lr {optimizer.param_groups[0]['lr']:.3e} "
                f"{time.time() - t0:.1f}s"
            )
    return {"loss": losses.avg, "kd_loss": kd_losses.avg}, num_updates


def _mixup_off(epoch, run: _Run, args) -> None:
    """``--mixup-off-epoch``: stop mixing from that epoch on (in the prefetcher's collate or the Mixup function)."""
    if not args.mixup_off_epoch or epoch < args.mixup_off_epoch:
        return
    if args.prefetcher and getattr(run.loader_train, "mixup_enabled", False):
        run.loader_train.mixup_enabled = False
    elif run.mixup_fn is not None:
        run.mixup_fn.mixup_enabled = False


def _backward_and_step(loss, run: _Run, args, need_update: bool) -> None:
    """Backward, then (on an update step) clip and step, through timm's loss scaler for float16 AMP on CUDA."""
    import timm.utils as tutils

    clip_params = None
    if args.clip_grad is not None:
        clip_params = run.task.get_clip_parameters(exclude_head="agc" in args.clip_mode)
    if run.loss_scaler is not None:
        run.loss_scaler(
            loss,
            run.optimizer,
            clip_grad=args.clip_grad,
            clip_mode=args.clip_mode,
            parameters=clip_params,
            need_update=need_update,
        )
        return
    loss.backward()
    if need_update:
        if clip_params is not None:
            tutils.dispatch_clip_grad(clip_params, value=args.clip_grad, mode=args.clip_mode)
        run.optimizer.step()


@torch.no_grad()
def validate(model, loader, args, device, amp_autocast):
    model.eval()
    total, loss_sum = torch.zeros(3, dtype=torch.float64, device=device), 0.0
    ce = nn.CrossEntropyLoss(reduction="sum")
    for input, target in loader:
        input, target = input.to(device), target.to(device)
        with amp_autocast():
            out = model(input)
        out = out.float()
        loss_sum += float(ce(out, target))
        top = out.topk(min(5, out.shape[-1]), -1).indices
        correct = top.eq(target[:, None])
        total += torch.tensor(
            [target.numel(), correct[:, 0].sum().item(), correct.any(-1).sum().item()],
            dtype=torch.float64,
            device=device,
        )
    stats = torch.cat([total, torch.tensor([loss_sum], dtype=torch.float64, device=device)])
    if args.distributed:
        torch.distributed.all_reduce(stats)
    n = max(float(stats[0]), 1.0)
    metrics = {"loss": float(stats[3]) / n, "top1": 100.0 * float(stats[1]) / n, "top5": 100.0 * float(stats[2]) / n}
    if tutils_primary(args):
        _logger.info(f"Eval: loss {metrics['loss']:.4f} top1 {metrics['top1']:.2f} top5 {metrics['top5']:.2f}")
    return metrics


def tutils_primary(args) -> bool:
    import timm.utils as tutils

    return tutils.is_primary(args)


def cli() -> None:
    main()


if __name__ == "__main__":
    cli()
