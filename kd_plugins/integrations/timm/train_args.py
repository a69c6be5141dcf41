"""Command line of ``kd-plugins-timm-train``: timm's ``train.py`` flags (a subset, with timm's names, defaults and
derivations), the ``-c/--config`` YAML file, and the ``--kd-*`` / ``--exit-*`` flags of kd_plugins.

The rules that follow timm's ``train.py``:

* ``-c FILE`` is read first; its keys (argparse ``dest`` names, as in timm's ``args.yaml``) become the parser's
  defaults, so any flag on the command line still wins.
* ``--lr`` is ``None`` by default and is then derived from ``--lr-base`` (:func:`resolve_lr`).
* ``--img-size`` / ``--input-size`` only size the data pipeline (``resolve_data_config``); the model is built at its
  own default size unless ``--model-kwargs img_size=N`` says otherwise.
* ``--input-img-mode`` defaults to ``RGB`` for three input channels and ``L`` otherwise
  (:func:`resolve_input_img_mode`).
"""

from __future__ import annotations

import argparse
import ast
import json
import logging
import math

import torch

_logger = logging.getLogger("kd_plugins.timm.train")


class ParseKwargs(argparse.Action):
    """``--model-kwargs img_size=28 patch_size=4`` as in timm (values read as Python literals, else kept as text).
    A single JSON object (``'{"img_size": 28}'``, the form older kd_plugins versions took) is accepted too."""

    def __call__(self, parser, namespace, values, option_string=None):
        if len(values) == 1 and values[0].lstrip().startswith("{"):
            setattr(namespace, self.dest, json.loads(values[0]))
            return
        kwargs = {}
        for item in values:
            if not item:
                continue
            if "=" not in item:
                parser.error(f"{option_string} takes KEY=VALUE pairs, got {item!r}")
            key, text = item.split("=", 1)
            try:
                kwargs[key] = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                kwargs[key] = text
        setattr(namespace, self.dest, kwargs)


def build_parser() -> argparse.ArgumentParser:
    """timm's usual training flags (a subset, same names and defaults) plus the ``--kd-*`` and ``--exit-*`` flags."""
    p = argparse.ArgumentParser(
        description="kd_plugins distillation training for timm models (timm's train.py flags plus --kd-*)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    # Consumed by parse_args before this parser runs; declared here so that --help lists it.
    p.add_argument("-c", "--config", default="", metavar="FILE", help="YAML file whose keys become the defaults")
    p.add_argument("data", nargs="?", default=None, metavar="DIR", help="path to dataset (or --data-dir)")
    for add_group in (
        _add_dataset_args,
        _add_model_args,
        _add_device_args,
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
    g.add_argument("--data-dir", default=None, metavar="DIR", help="path to dataset (root folder)")
    g.add_argument("--dataset", "-d", default="", help="dataset type (default: ImageFolder/ImageTar if empty)")
    g.add_argument("--train-split", default="train")
    g.add_argument("--val-split", default="validation")
    g.add_argument("--train-num-samples", type=int, default=None, help="samples in the train split (iterable sets)")
    g.add_argument("--val-num-samples", type=int, default=None, help="samples in the val split (iterable sets)")
    g.add_argument("--class-map", default="")
    g.add_argument("--dataset-download", action="store_true", default=False)
    g.add_argument(
        "--input-img-mode",
        default=None,
        help="PIL mode images are converted to (default: 'RGB' for three input channels, else 'L')",
    )
    g.add_argument("--input-key", default=None, help="dataset key of the images (HF / WDS datasets)")
    g.add_argument("--target-key", default=None, help="dataset key of the labels (HF / WDS datasets)")
    g.add_argument("--dataset-trust-remote-code", action="store_true", default=False)
    g.add_argument("--epoch-repeats", type=float, default=0.0, help="repeat the train set this many times per epoch")


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
    g.add_argument("--gp", default=None, help="global pool type")
    g.add_argument(
        "--img-size",
        type=int,
        default=None,
        help="data pipeline image size (the model keeps its own; ViTs: --model-kwargs img_size=N)",
    )
    g.add_argument("--in-chans", type=int, default=None, help="input channels (default: --input-size's, else 3)")
    g.add_argument("--input-size", default=None, nargs=3, type=int, metavar="N", help="C H W of the data pipeline")
    g.add_argument("--crop-pct", default=None, type=float)
    g.add_argument("--mean", type=float, nargs="+", default=None)
    g.add_argument("--std", type=float, nargs="+", default=None)
    g.add_argument("--interpolation", default="")
    g.add_argument("-b", "--batch-size", type=int, default=128)
    g.add_argument("-vb", "--validation-batch-size", type=int, default=None)
    g.add_argument("--channels-last", action="store_true", default=False)
    g.add_argument("--grad-accum-steps", type=int, default=1)
    g.add_argument("--grad-checkpointing", action="store_true", default=False)
    g.add_argument(
        "--model-kwargs",
        nargs="*",
        default={},
        action=ParseKwargs,
        help="extra create_model kwargs of the student: KEY=VALUE ... (e.g. img_size=28 patch_size=4)",
    )
    g.add_argument("--head-init-scale", type=float, default=None)
    g.add_argument("--head-init-bias", type=float, default=None)
    g.add_argument("--torchcompile", nargs="?", type=str, default=None, const="inductor")
    g.add_argument("--torchcompile-mode", type=str, default=None)


def _add_device_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Device")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="timm: 'cuda'")
    g.add_argument("--amp", action="store_true", default=False)
    g.add_argument("--amp-dtype", default="float16", choices=["float16", "bfloat16"])
    g.add_argument("--dist-backend", default=None)


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
    g.add_argument("--layer-decay-min-scale", type=float, default=0)
    g.add_argument("--layer-decay-no-opt-scale", type=float, default=None)
    g.add_argument("--opt-kwargs", nargs="*", default={}, action=ParseKwargs, help="extra optimizer kwargs")


def _add_schedule_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Learning rate schedule")
    g.add_argument("--sched", default="cosine")
    g.add_argument("--sched-on-updates", action="store_true", default=False)
    g.add_argument("--lr", type=float, default=None, help="learning rate (default: derived from --lr-base)")
    g.add_argument("--lr-base", type=float, default=0.1, help="lr = lr_base * global batch size / lr_base_size")
    g.add_argument("--lr-base-size", type=int, default=256)
    g.add_argument(
        "--lr-base-scale", default="", help="'linear' or 'sqrt' (default: sqrt for ada*/lamb optimizers, else linear)"
    )
    g.add_argument("--lr-noise", type=float, nargs="+", default=None)
    g.add_argument("--lr-noise-pct", type=float, default=0.67)
    g.add_argument("--lr-noise-std", type=float, default=1.0)
    g.add_argument("--lr-cycle-mul", type=float, default=1.0)
    g.add_argument("--lr-cycle-decay", type=float, default=0.5)
    g.add_argument("--lr-cycle-limit", type=int, default=1)
    g.add_argument("--lr-k-decay", type=float, default=1.0)
    g.add_argument("--warmup-lr", type=float, default=1e-5)
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--epochs", type=int, default=300)
    g.add_argument("--start-epoch", type=int, default=None, help="overrides the epoch of --resume")
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
    g.add_argument("--train-crop-mode", default=None)
    g.add_argument("--scale", type=float, nargs="+", default=[0.08, 1.0])
    g.add_argument("--ratio", type=float, nargs="+", default=[3.0 / 4.0, 4.0 / 3.0])
    g.add_argument("--hflip", type=float, default=0.5)
    g.add_argument("--vflip", type=float, default=0.0)
    g.add_argument("--color-jitter", type=float, default=0.4)
    g.add_argument("--color-jitter-prob", type=float, default=None)
    g.add_argument("--grayscale-prob", type=float, default=None)
    g.add_argument("--gaussian-blur-prob", type=float, default=None)
    g.add_argument("--aa", default=None)
    g.add_argument("--reprob", type=float, default=0.0)
    g.add_argument("--remode", default="pixel")
    g.add_argument("--recount", type=int, default=1)
    g.add_argument("--mixup", type=float, default=0.0)
    g.add_argument("--cutmix", type=float, default=0.0)
    g.add_argument("--cutmix-minmax", type=float, nargs="+", default=None)
    g.add_argument("--mixup-prob", type=float, default=1.0)
    g.add_argument("--mixup-switch-prob", type=float, default=0.5)
    g.add_argument("--mixup-mode", default="batch")
    g.add_argument("--mixup-off-epoch", type=int, default=0, help="turn Mixup/CutMix off from this epoch (0: never)")
    g.add_argument("--smoothing", type=float, default=0.1)
    g.add_argument("--train-interpolation", default="random")
    g.add_argument("--drop", type=float, default=0.0)
    g.add_argument("--drop-path", type=float, default=None)
    g.add_argument("--drop-block", type=float, default=None)
    g.add_argument("--bn-momentum", type=float, default=None)
    g.add_argument("--bn-eps", type=float, default=None)
    g.add_argument("--dist-bn", default="reduce", help="'broadcast', 'reduce' or '' after each epoch")


def _add_ema_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("EMA")
    g.add_argument("--model-ema", action="store_true", default=False)
    g.add_argument("--model-ema-decay", type=float, default=0.9998)
    g.add_argument("--model-ema-warmup", action="store_true", default=False)


def _add_misc_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Misc")
    g.add_argument("--seed", type=int, default=42)
    g.add_argument("--worker-seeding", default="all")
    g.add_argument("--log-interval", type=int, default=50)
    g.add_argument("--checkpoint-hist", type=int, default=10)
    g.add_argument("-j", "--workers", type=int, default=4)
    g.add_argument("--no-prefetcher", action="store_true", default=False)
    g.add_argument("--pin-mem", action="store_true", default=False)
    g.add_argument("--output", default="", help="output folder (default: ./output/train)")
    g.add_argument("--experiment", default="")
    g.add_argument("--eval-metric", default="top1")


def _add_kd_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Knowledge distillation (kd_plugins)")
    g.add_argument(
        "--kd-model-name",
        default=None,
        help="teacher timm model name; enables distillation. Several teachers: comma-separated names (a TeacherSet, "
        "one --kd-teacher-checkpoint each, logit terms only)",
    )
    g.add_argument(
        "--kd-model-kwargs",
        nargs="*",
        default={},
        action=ParseKwargs,
        help="extra create_model kwargs of the teacher, KEY=VALUE ... like --model-kwargs",
    )
    g.add_argument(
        "--kd-teacher-checkpoint",
        default=None,
        help="teacher weights (.pth/.pth.tar/.safetensors) for --kd-model-name; must match the architecture "
        "(several teachers: comma-separated, in the order of --kd-model-name)",
    )
    g.add_argument(
        "--kd-teacher-weights",
        default=None,
        help="several teachers: comma-separated non-negative weights, one per teacher (default: uniform)",
    )
    g.add_argument(
        "--kd-teacher-aggregation",
        default="mixture",
        choices=["mixture", "sum_of_divergences"],
        help="several teachers: mix their probabilities, or sum the weighted per-teacher divergences",
    )
    g.add_argument(
        "--kd-teacher-offload",
        action="store_true",
        default=False,
        help="several teachers: park them on CPU, each moved to the device only for its forward",
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
    g.add_argument(
        "--kd-method",
        default="kd",
        choices=["kd", "prockd"],
        help="'kd': the --kd-loss / --kd-feature-* terms (KDTask); 'prockd': ProC-KD (ProCKDTask), prototype-guided "
        "distillation from the teacher's last feature map, for a teacher of another label space (its head unused)",
    )
    g.add_argument(
        "--kd-prockd-prototypes", type=int, default=32, help="ProC-KD: prototypes of the teacher's local features"
    )
    g.add_argument(
        "--kd-prockd-features",
        default="-1=-1",
        help="ProC-KD: STUDENT=TEACHER feature maps (forward_intermediates indices or module names); use an earlier "
        "map when the last one is 1x1 at small input sizes: --kd-prockd-features=-3=-3 (with '=', as the value "
        "starts with '-')",
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


# timm's args.yaml names a few settings differently from this parser's destinations.
_YAML_ALIASES = {"kd_loss_type": "kd_loss"}


def parse_args_and_text(argv=None) -> tuple[argparse.Namespace, str]:
    """Parse ``argv`` as timm's ``train.py`` does: ``-c FILE`` first (its keys become the parser's defaults, the
    command line still wins), then every other flag. Returns the arguments and their YAML text (written to the
    output folder as ``args.yaml``, as timm does, before anything is derived from them)."""
    import yaml

    config_parser = argparse.ArgumentParser(add_help=False)
    config_parser.add_argument("-c", "--config", default="")
    config_args, remaining = config_parser.parse_known_args(argv)
    parser = build_parser()
    if config_args.config:
        parser.set_defaults(**{**_read_config(config_args.config, parser), "config": config_args.config})
    args = parser.parse_args(remaining)
    args_text = yaml.safe_dump(_plain(vars(args)), default_flow_style=False)
    args.data_dir = args.data_dir or args.data
    if not args.data_dir:
        parser.error("the dataset folder is required (DIR or --data-dir)")
    if args.pretrained:
        parser.error("--pretrained would download weights; kd_plugins never does. Use --initial-checkpoint PATH.")
    for name in ("model_kwargs", "opt_kwargs", "kd_model_kwargs"):  # a YAML file may hold JSON text
        if isinstance(getattr(args, name), str):
            setattr(args, name, json.loads(getattr(args, name)))
    return args, args_text


def parse_args(argv=None) -> argparse.Namespace:
    """The parsed arguments of ``argv`` (see :func:`parse_args_and_text`)."""
    return parse_args_and_text(argv)[0]


def _plain(value):
    """``value`` with tuples as lists (``--model-kwargs img_size=(28,28)``), so that ``yaml.safe_dump`` takes it."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _read_config(path: str, parser: argparse.ArgumentParser) -> dict:
    """The YAML file's keys, with timm's aliases mapped. Keys that are no flag of this entry point are kept (timm's
    optimizer / scheduler helpers read some of them from the arguments, as in timm) and reported."""
    import yaml

    with open(path) as f:
        cfg = yaml.safe_load(f) or {}
    if not isinstance(cfg, dict):
        parser.error(f"-c {path}: expected a YAML mapping of argument names to values, got {type(cfg).__name__}")
    for old, new in _YAML_ALIASES.items():
        if old in cfg and new not in cfg:
            cfg[new] = cfg.pop(old)
    known = {a.dest for a in parser._actions}
    unknown = sorted(k for k in cfg if k not in known)
    if unknown:
        _logger.warning(
            f"-c {path}: not flags of kd-plugins-timm-train (kept in the arguments, else unused): {unknown}"
        )
    return cfg


def resolve_lr(args: argparse.Namespace, world_size: int = 1, verbose: bool = True) -> float:
    """``args.lr`` when given, else ``lr_base * global_batch / lr_base_size`` (square root of that ratio with
    ``--lr-base-scale sqrt``, the default for ``ada*`` / ``lamb`` optimizers), as timm's ``train.py`` derives it.
    Sets ``args.lr`` (and ``args.lr_base_scale`` when it was empty) and returns the learning rate."""
    if args.lr:
        return args.lr
    global_batch = args.batch_size * world_size * max(1, args.grad_accum_steps)
    ratio = global_batch / args.lr_base_size
    if not args.lr_base_scale:
        opt = args.opt.lower()
        args.lr_base_scale = "sqrt" if ("ada" in opt or "lamb" in opt) else "linear"
    if args.lr_base_scale == "sqrt":
        ratio = math.sqrt(ratio)
    args.lr = args.lr_base * ratio
    if verbose:
        _logger.info(
            f"Learning rate ({args.lr:g}) derived from --lr-base {args.lr_base:g} and the global batch size "
            f"({global_batch}) with {args.lr_base_scale} scaling"
        )
    return args.lr


def resolve_input_img_mode(args: argparse.Namespace, data_config: dict) -> str:
    """``--input-img-mode`` when given, else ``RGB`` for three input channels and ``L`` otherwise (timm's rule)."""
    if args.input_img_mode:
        return args.input_img_mode
    return "RGB" if data_config["input_size"][0] == 3 else "L"
