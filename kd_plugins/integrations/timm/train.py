#!/usr/bin/env python3
"""Distillation training for timm models: ``kd-plugins-timm-train`` / ``python -m kd_plugins.integrations.timm.train``.

Built from timm's own library parts (``create_model``, ``create_dataset``/``create_loader``, ``Mixup``,
``create_optimizer_v2``, ``create_scheduler_v2``, ``CheckpointSaver``, task EMA, ``resume_task_checkpoint``) around
:class:`kd_plugins.integrations.timm.KDTask`. It accepts the usual timm training flags (a subset of timm's
``train.py``, same names and defaults) plus ``--kd-*`` flags named like timm's::

    python -m kd_plugins.integrations.timm.train /data/imagenette --model resnet18 --num-classes 10 \\
        --kd-model-name resnet50 --kd-teacher-checkpoint teacher.pth.tar \\
        --kd-loss kl:1.0,hidden_mse:0.5 --kd-feature-pairs 3=3,4=4 --kd-temperature 4 --distill-loss-weight 1

Distributed: ``torchrun --nproc_per_node N -m kd_plugins.integrations.timm.train ...`` (only the student and the
distillation modules are wrapped in DDP). Checkpoints hold the plain student ``state_dict`` (loadable with
``timm.create_model(model, num_classes=...)``) and the projectors/branches under ``task_state``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from contextlib import nullcontext
from datetime import datetime
from functools import partial

import torch
import torch.nn as nn

_logger = logging.getLogger("kd_plugins.timm.train")


def build_parser() -> argparse.ArgumentParser:
    """timm's usual training flags (a subset, same names and defaults) plus the ``--kd-*`` and ``--exit-*`` flags."""
    p = argparse.ArgumentParser(
        description="kd_plugins distillation training for timm models",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("data_dir", nargs="?", default=None, metavar="DIR", help="path to dataset (root folder)")
    for add_group in (
        _add_dataset_args,
        _add_model_args,
        _add_optimizer_args,
        _add_schedule_args,
        _add_augmentation_args,
        _add_ema_args,
        _add_misc_args,
        _add_kd_args,
        _add_multi_exit_args,
    ):
        add_group(p)
    return p


def _add_dataset_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Dataset")
    g.add_argument("--data-dir", dest="data_dir_opt", default=None, help="path to dataset (alternative to DIR)")
    g.add_argument("--dataset", "-d", default="", help="dataset type (default: ImageFolder/ImageTar if empty)")
    g.add_argument("--train-split", default="train")
    g.add_argument("--val-split", default="validation")
    g.add_argument("--class-map", default="")
    g.add_argument("--dataset-download", action="store_true", default=False)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Model")
    g.add_argument("--model", default="resnet50", help="student model name")
    g.add_argument(
        "--pretrained",
        action="store_true",
        default=False,
        help="refused: kd_plugins never downloads weights (use --initial-checkpoint)",
    )
    g.add_argument("--initial-checkpoint", default="", help="initialise the student from this checkpoint")
    g.add_argument("--resume", default="", help="resume student, task state and optimizer from a checkpoint")
    g.add_argument("--no-resume-opt", action="store_true", default=False)
    g.add_argument("--num-classes", type=int, default=None)
    g.add_argument("--in-chans", type=int, default=None)
    g.add_argument("--gp", default=None, help="global pool type")
    g.add_argument("--img-size", type=int, default=None)
    g.add_argument("--input-size", default=None, nargs=3, type=int, metavar="N N N")
    g.add_argument("--crop-pct", default=None, type=float)
    g.add_argument("--mean", type=float, nargs="+", default=None)
    g.add_argument("--std", type=float, nargs="+", default=None)
    g.add_argument("--interpolation", default="")
    g.add_argument("-b", "--batch-size", type=int, default=128)
    g.add_argument("-vb", "--validation-batch-size", type=int, default=None)
    g.add_argument("--channels-last", action="store_true", default=False)
    g.add_argument("--grad-accum-steps", type=int, default=1)
    g.add_argument("--grad-checkpointing", action="store_true", default=False)
    g.add_argument("--model-kwargs", default=None, help="JSON dict of extra student create_model kwargs")


def _add_optimizer_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Optimizer")
    g.add_argument("--opt", default="sgd")
    g.add_argument("--opt-eps", default=None, type=float)
    g.add_argument("--opt-betas", default=None, type=float, nargs="+")
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--weight-decay", type=float, default=2e-5)
    g.add_argument("--clip-grad", type=float, default=None)
    g.add_argument("--clip-mode", default="norm")
    g.add_argument("--layer-decay", type=float, default=None)


def _add_schedule_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Learning rate schedule")
    g.add_argument("--sched", default="cosine")
    g.add_argument("--sched-on-updates", action="store_true", default=False)
    g.add_argument("--lr", type=float, default=0.05)
    g.add_argument("--warmup-lr", type=float, default=1e-5)
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--epochs", type=int, default=300)
    g.add_argument("--decay-epochs", type=float, default=90)
    g.add_argument("--decay-milestones", default=[90, 180, 270], type=int, nargs="+")
    g.add_argument("--warmup-epochs", type=int, default=5)
    g.add_argument("--warmup-prefix", action="store_true", default=False)
    g.add_argument("--cooldown-epochs", type=int, default=0)
    g.add_argument("--patience-epochs", type=int, default=10)
    g.add_argument("--decay-rate", "--dr", type=float, default=0.1)


def _add_augmentation_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Augmentation and regularization")
    g.add_argument("--no-aug", action="store_true", default=False)
    g.add_argument("--scale", type=float, nargs="+", default=[0.08, 1.0])
    g.add_argument("--ratio", type=float, nargs="+", default=[3.0 / 4.0, 4.0 / 3.0])
    g.add_argument("--hflip", type=float, default=0.5)
    g.add_argument("--vflip", type=float, default=0.0)
    g.add_argument("--color-jitter", type=float, default=0.4)
    g.add_argument("--aa", default=None)
    g.add_argument("--reprob", type=float, default=0.0)
    g.add_argument("--remode", default="pixel")
    g.add_argument("--recount", type=int, default=1)
    g.add_argument("--mixup", type=float, default=0.0)
    g.add_argument("--cutmix", type=float, default=0.0)
    g.add_argument("--mixup-prob", type=float, default=1.0)
    g.add_argument("--mixup-switch-prob", type=float, default=0.5)
    g.add_argument("--mixup-mode", default="batch")
    g.add_argument("--smoothing", type=float, default=0.1)
    g.add_argument("--train-interpolation", default="random")
    g.add_argument("--drop", type=float, default=0.0)
    g.add_argument("--drop-path", type=float, default=None)
    g.add_argument("--bn-momentum", type=float, default=None)
    g.add_argument("--bn-eps", type=float, default=None)
    g.add_argument("--dist-bn", default="reduce", help="'broadcast', 'reduce' or '' after each epoch")


def _add_ema_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("EMA")
    g.add_argument("--model-ema", action="store_true", default=False)
    g.add_argument("--model-ema-decay", type=float, default=0.9998)


def _add_misc_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Misc")
    g.add_argument("--seed", type=int, default=42)
    g.add_argument("--log-interval", type=int, default=50)
    g.add_argument("--checkpoint-hist", type=int, default=10)
    g.add_argument("-j", "--workers", type=int, default=4)
    g.add_argument("--amp", action="store_true", default=False)
    g.add_argument("--amp-dtype", default="bfloat16", choices=["float16", "bfloat16"])
    g.add_argument("--no-prefetcher", action="store_true", default=False)
    g.add_argument("--pin-mem", action="store_true", default=False)
    g.add_argument("--output", default="", help="output folder (default: ./output/train)")
    g.add_argument("--experiment", default="")
    g.add_argument("--eval-metric", default="top1")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    g.add_argument("--dist-backend", default=None)
    g.add_argument("--torchcompile", nargs="?", type=str, default=None, const="inductor")


def _add_kd_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Knowledge distillation (kd_plugins)")
    g.add_argument("--kd-model-name", default=None, help="teacher timm model name; enables distillation")
    g.add_argument(
        "--kd-teacher-checkpoint",
        default=None,
        help="teacher weights (.pth/.pth.tar/.safetensors) for --kd-model-name; must match the architecture",
    )
    g.add_argument(
        "--kd-teacher-num-classes",
        type=int,
        default=None,
        help="teacher classes (default: the student's; must match for logit losses)",
    )
    g.add_argument(
        "--kd-teacher-input-size",
        type=int,
        nargs="+",
        default=None,
        help="resize teacher inputs to this size (H [W]) when it was trained at another resolution",
    )
    g.add_argument(
        "--kd-loss",
        "--kd-loss-type",
        dest="kd_loss",
        default="kl",
        help="loss terms: 'kl', 'dkd', 'ofa', 'kl:1.0,hidden_mse:0.5' or JSON (any kd_plugins logits/hidden loss)",
    )
    g.add_argument(
        "--kd-loss-kwargs",
        default=None,
        help='per-term hyper-parameters as JSON, e.g. \'{"dkd": {"beta": 8}, "ofa": {"eps": 1.5}}\'',
    )
    g.add_argument("--kd-temperature", type=float, default=4.0, help="temperature of the logit losses (not OFA)")
    g.add_argument("--distill-loss-weight", type=float, default=None)
    g.add_argument("--task-loss-weight", type=float, default=None)
    g.add_argument(
        "--kd-feature-pairs",
        default=None,
        help="student=teacher forward_intermediates indices or module names, e.g. '2=3,-1=-1'",
    )
    g.add_argument("--kd-feature-loss", default="mse", choices=["mse", "cosine"])
    g.add_argument("--kd-feature-weight", type=float, default=1.0)
    g.add_argument(
        "--kd-feature-align",
        default="linear",
        choices=["linear", "csf"],
        help="linear: 1x1 projector per pair; csf: TransKD cross selective fusion + HCL loss",
    )
    g.add_argument("--kd-ofa-stages", default="auto", help="OFA exit stages: 'auto', 'none' or '1,2,3'")
    g.add_argument("--kd-ofa-branch-weight", type=float, default=1.0)
    g.add_argument("--kd-patch-embed-weight", type=float, default=0.0, help="TransKD patch-embedding alignment")


def _add_multi_exit_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Multi-exit self-distillation (kd_plugins.multiexit)")
    g.add_argument(
        "--exit-layers",
        default=None,
        help="exits after these blocks (ViT) / stages (ResNet), 1-based, e.g. '2,4,6'; trains with "
        "MultiExitTask (with --kd-model-name the teacher is distilled into every exit)",
    )
    g.add_argument("--exit-head", default="separate", choices=["shared", "separate"])
    g.add_argument("--exit-weights", default="depth", help="'depth' (layer/L), 'uniform' or one float per exit")
    g.add_argument(
        "--exit-self-distill-weight",
        type=float,
        default=1.0,
        help="KD weight from the deepest exit to the shallower ones",
    )
    g.add_argument("--exit-temperature", type=float, default=1.0, help="temperature of the exits' logit KD")
    g.add_argument(
        "--exit-export",
        action="store_true",
        default=False,
        help="after training, save each exit's standalone truncated model as exits/exit{k}.safetensors "
        "(+ exits/exit{k}.json: the timm.create_model arguments) in the output folder",
    )


def _stages(text):
    if text is None or str(text).lower() in ("none", "", "0"):
        return None
    if str(text).lower() == "auto":
        return "auto"
    from ...vision.features import parse_spec

    return [parse_spec(t) for t in str(text).split(",") if t.strip()]


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    args.data_dir = args.data_dir or args.data_dir_opt
    if not args.data_dir:
        parser.error("the dataset folder is required (DIR or --data-dir)")
    if args.pretrained:
        parser.error("--pretrained would download weights; kd_plugins never does. Use --initial-checkpoint PATH.")
    args.model_kwargs = json.loads(args.model_kwargs) if args.model_kwargs else {}
    return args


def main(argv=None) -> dict:
    """Train (and distil) as configured by the command line ``argv``; returns the best metric and epoch, the output
    folder, the last evaluation and the exported exits."""
    import timm.utils as tutils

    tutils.setup_default_logging()
    args = parse_args(argv)
    device = tutils.init_distributed_device(args)
    primary = tutils.is_primary(args)
    tutils.random_seed(args.seed, args.rank)

    model, data_config, create_kwargs = _build_student(args, device, primary)
    task = _build_task(args, model, data_config, create_kwargs, device, primary)
    mixup_fn = _set_criterion(args, task)
    optimizer, resume_epoch = _prepare_task(args, task, device, primary)
    loader_train, loader_eval = _build_loaders(args, data_config, device)
    saver, output_dir = _make_saver(args, task, optimizer, data_config) if primary else (None, None)
    best_metric, best_epoch, eval_metrics = _run_epochs(
        args, task, optimizer, loader_train, loader_eval, device, mixup_fn, saver, output_dir, resume_epoch or 0
    )
    if primary and best_metric is not None:
        _logger.info(f"*** Best metric: {best_metric} (epoch {best_epoch})")
    exports = {}
    if args.exit_layers and args.exit_export and output_dir is not None:
        exports = _export_exits(task.model, args.model, output_dir)
    if args.distributed:
        torch.distributed.barrier()
    return {
        "best_metric": best_metric,
        "best_epoch": best_epoch,
        "output_dir": output_dir,
        "eval": eval_metrics,
        "exit_exports": exports,
    }


def _build_student(args, device, primary):
    """The student on ``device``, its resolved data config and its ``create_model`` kwargs (for exit exports)."""
    from timm.data import resolve_data_config

    from ...vision.models import create_timm_model, load_checkpoint_strict

    in_chans = args.in_chans or (args.input_size[0] if args.input_size else 3)
    kw = dict(
        num_classes=args.num_classes,
        in_chans=in_chans,
        drop_rate=args.drop,
        drop_path_rate=args.drop_path,
        global_pool=args.gp,
        bn_momentum=args.bn_momentum,
        bn_eps=args.bn_eps,
    )
    if args.img_size is not None:
        kw["img_size"] = args.img_size
    kw.update(args.model_kwargs)
    model = create_timm_model(args.model, **{k: v for k, v in kw.items() if v is not None})
    if args.initial_checkpoint:
        load_checkpoint_strict(model, args.initial_checkpoint, role="student")
    if args.num_classes is None:
        args.num_classes = model.num_classes
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)
    data_config = resolve_data_config(vars(args), model=model, verbose=primary)
    model.to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    create_kwargs = {k: v for k, v in kw.items() if v is not None and k not in ("drop_rate", "drop_path_rate")}
    return model, data_config, create_kwargs


def _build_task(args, model, data_config, create_kwargs, device, primary):
    """``MultiExitTask`` (``--exit-layers``), ``KDTask`` (``--kd-model-name``) or timm's ``ClassificationTask``."""
    from .task import KDTask

    if args.exit_layers:
        task = _multi_exit_task(args, model, create_kwargs, device, primary)
    elif args.kd_model_name:
        teacher_kwargs = {"num_classes": args.kd_teacher_num_classes} if args.kd_teacher_num_classes else None
        task = KDTask(
            student_model=model,
            teacher_model=args.kd_model_name,
            teacher_checkpoint=args.kd_teacher_checkpoint,
            teacher_kwargs=teacher_kwargs,
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
            student_mean=data_config["mean"],
            student_std=data_config["std"],
            device=device,
            verbose=primary,
        )
    else:
        from timm.task import ClassificationTask

        task = ClassificationTask(model, device=device, verbose=primary)
    task.to(device)
    return task


def _set_criterion(args, task):
    """The task loss as in timm's train.py (Mixup/CutMix soft targets or label smoothing); returns the Mixup
    function (``None`` without Mixup/CutMix)."""
    from timm.data import Mixup

    if args.mixup > 0 or args.cutmix > 0:
        from timm.loss import SoftTargetCrossEntropy

        task.criterion = SoftTargetCrossEntropy()
        return Mixup(
            mixup_alpha=args.mixup,
            cutmix_alpha=args.cutmix,
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


def _prepare_task(args, task, device, primary):
    """Optimizer over the trainable module, then resume, EMA, ``torch.compile`` and DDP (in timm's order).
    Returns the optimizer and the resumed epoch (``None`` without ``--resume``)."""
    from timm.optim import create_optimizer_v2, optimizer_kwargs

    optimizer = create_optimizer_v2(task.get_trainable_module(), **optimizer_kwargs(cfg=args))
    resume_epoch = None
    if args.resume:
        from timm.task import resume_task_checkpoint

        resume_epoch = resume_task_checkpoint(
            task, args.resume, optimizer=None if args.no_resume_opt else optimizer, log_info=primary
        )
    if args.model_ema:
        task.setup_ema(decay=args.model_ema_decay)
    if args.torchcompile:
        task.compile(backend=args.torchcompile)
    if args.distributed:
        task.prepare_distributed(device_ids=[device] if device.type == "cuda" else None)
    return optimizer, resume_epoch


def _build_loaders(args, data_config, device):
    """timm train/eval datasets and loaders (augmentation from the flags, normalisation from ``data_config``)."""
    from timm.data import create_dataset, create_loader

    root = args.data_dir
    dataset_train = create_dataset(
        args.dataset,
        root=root,
        split=args.train_split,
        is_training=True,
        class_map=args.class_map,
        download=args.dataset_download,
        batch_size=args.batch_size,
        seed=args.seed,
    )
    dataset_eval = create_dataset(
        args.dataset,
        root=root,
        split=args.val_split,
        is_training=False,
        class_map=args.class_map,
        download=args.dataset_download,
        batch_size=args.batch_size,
    )
    prefetch = not args.no_prefetcher and device.type == "cuda"
    loader_train = create_loader(
        dataset_train,
        input_size=data_config["input_size"],
        batch_size=args.batch_size,
        is_training=True,
        use_prefetcher=prefetch,
        no_aug=args.no_aug,
        re_prob=args.reprob,
        re_mode=args.remode,
        re_count=args.recount,
        scale=args.scale,
        ratio=args.ratio,
        hflip=args.hflip,
        vflip=args.vflip,
        color_jitter=args.color_jitter,
        auto_augment=args.aa,
        interpolation=args.train_interpolation
        if not args.no_aug and args.train_interpolation
        else data_config["interpolation"],
        mean=data_config["mean"],
        std=data_config["std"],
        num_workers=args.workers,
        distributed=args.distributed,
        pin_memory=args.pin_mem,
        device=device,
    )
    loader_eval = create_loader(
        dataset_eval,
        input_size=data_config["input_size"],
        batch_size=args.validation_batch_size or args.batch_size,
        is_training=False,
        use_prefetcher=prefetch,
        interpolation=data_config["interpolation"],
        mean=data_config["mean"],
        std=data_config["std"],
        num_workers=args.workers,
        distributed=args.distributed,
        crop_pct=data_config["crop_pct"],
        pin_memory=args.pin_mem,
        device=device,
    )
    return loader_train, loader_eval


def _make_saver(args, task, optimizer, data_config):
    """The output folder (with ``args.json``) and timm's ``CheckpointSaver`` over the task (primary rank only)."""
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
        model=task.get_eval_model(),
        optimizer=optimizer,
        args=args,
        task=task,
        checkpoint_dir=output_dir,
        recovery_dir=output_dir,
        decreasing=args.eval_metric == "loss",
        max_history=args.checkpoint_hist,
    )
    with open(os.path.join(output_dir, "args.json"), "w") as f:
        json.dump(
            {k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool, list, type(None)))},
            f,
            indent=1,
        )
    return saver, output_dir


def _run_epochs(args, task, optimizer, loader_train, loader_eval, device, mixup_fn, saver, output_dir, start_epoch):
    """The LR schedule and the epoch loop (train, sync BN, validate, log, checkpoint); returns the best metric,
    its epoch and the last evaluation."""
    import timm.utils as tutils
    from timm.scheduler import create_scheduler_v2, scheduler_kwargs

    updates_per_epoch = (len(loader_train) + args.grad_accum_steps - 1) // args.grad_accum_steps
    lr_scheduler, num_epochs = create_scheduler_v2(
        optimizer, **scheduler_kwargs(args), updates_per_epoch=updates_per_epoch
    )
    if lr_scheduler is not None and start_epoch > 0:
        lr_scheduler.step(start_epoch)
    amp_autocast = (
        partial(torch.autocast, device_type=device.type, dtype=getattr(torch, args.amp_dtype))
        if args.amp
        else nullcontext
    )
    best_metric, best_epoch, eval_metrics, num_updates = None, None, {}, start_epoch * updates_per_epoch
    for epoch in range(start_epoch, num_epochs):
        if args.distributed and hasattr(loader_train.sampler, "set_epoch"):
            loader_train.sampler.set_epoch(epoch)
        train_metrics, num_updates = train_one_epoch(
            epoch,
            task,
            loader_train,
            optimizer,
            args,
            device,
            lr_scheduler,
            amp_autocast,
            mixup_fn,
            num_updates,
            updates_per_epoch,
        )
        if args.distributed and args.dist_bn in ("broadcast", "reduce"):
            tutils.distribute_bn(task.get_eval_model(), args.world_size, args.dist_bn == "reduce")
        eval_metrics = validate(task.get_eval_model(), loader_eval, args, device, amp_autocast)
        if task.has_ema():
            eval_metrics = validate(task.get_eval_model(ema=True), loader_eval, args, device, amp_autocast)
        if output_dir is not None:
            tutils.update_summary(
                epoch,
                train_metrics,
                eval_metrics,
                filename=os.path.join(output_dir, "summary.csv"),
                lr=optimizer.param_groups[0]["lr"],
                write_header=best_metric is None,
            )
        if saver is not None:
            best_metric, best_epoch = saver.save_checkpoint(epoch, metric=eval_metrics[args.eval_metric])
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
        teacher = create_timm_model(
            args.kd_model_name,
            num_classes=args.kd_teacher_num_classes or args.num_classes,
            in_chans=create_kwargs.get("in_chans", 3),
        )
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


def train_one_epoch(
    epoch, task, loader, optimizer, args, device, lr_scheduler, amp_autocast, mixup_fn, num_updates, updates_per_epoch
):
    import timm.utils as tutils

    task.train()
    losses, kd_losses = tutils.AverageMeter(), tutils.AverageMeter()
    accum = max(1, args.grad_accum_steps)
    optimizer.zero_grad()
    last_idx = len(loader) - 1
    t0 = time.time()
    for batch_idx, (input, target) in enumerate(loader):
        need_update = (batch_idx + 1) % accum == 0 or batch_idx == last_idx
        input, target = input.to(device), target.to(device)
        if mixup_fn is not None:
            input, target = mixup_fn(input, target)
        if args.channels_last:
            input = input.contiguous(memory_format=torch.channels_last)
        ctx = task.no_sync() if (args.distributed and not need_update) else nullcontext()
        with ctx:
            with amp_autocast():
                result = task(input, target)
            loss = result["loss"] / accum
            loss.backward()
        if need_update:
            if args.clip_grad is not None:
                tutils.dispatch_clip_grad(
                    task.get_clip_parameters(exclude_head="agc" in args.clip_mode),
                    value=args.clip_grad,
                    mode=args.clip_mode,
                )
            optimizer.step()
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
