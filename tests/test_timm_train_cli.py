"""``kd-plugins-timm-train`` takes timm's ``train.py`` flags with timm's names, defaults and derivations (``--lr`` from
``--lr-base``, ``-c`` YAML defaults, ``--input-img-mode`` 'L' for one channel, ``--img-size`` for the data only), and
trains end to end on real image folders: grayscale digits and RGB photo crops, CNN and ViT, with and without KD."""

import argparse
import csv
import math
import os

import numpy as np
import pytest
import torch
import yaml

from kd_plugins.integrations.timm.train import main
from kd_plugins.integrations.timm.train_args import (
    build_parser,
    parse_args,
    parse_args_and_text,
    resolve_input_img_mode,
    resolve_lr,
)

PIL = pytest.importorskip("PIL.Image")
datasets = pytest.importorskip("sklearn.datasets")  # real images, offline: digits and two sample photos

# A tiny ViT at 28 px / 32 px: timm's train.py builds the model through --model-kwargs, not --img-size.
TINY_VIT = ["depth=2", "embed_dim=32", "num_heads=2"]
RUN = ["-b", "4", "--epochs", "1", "--warmup-epochs", "0", "-j", "0", "--log-interval", "1"]

# The defaults of timm's train.py (the flags this entry point shares with it).
TIMM_DEFAULTS = {
    "lr": None,
    "lr_base": 0.1,
    "lr_base_size": 256,
    "lr_base_scale": "",
    "amp": False,
    "amp_dtype": "float16",
    "model": "resnet50",
    "model_kwargs": {},
    "opt_kwargs": {},
    "img_size": None,
    "input_size": None,
    "in_chans": None,
    "input_img_mode": None,
    "batch_size": 128,
    "opt": "sgd",
    "momentum": 0.9,
    "weight_decay": 2e-5,
    "sched": "cosine",
    "epochs": 300,
    "warmup_epochs": 5,
    "warmup_lr": 1e-5,
    "min_lr": 0,
    "lr_cycle_decay": 0.5,
    "lr_cycle_limit": 1,
    "lr_noise_pct": 0.67,
    "smoothing": 0.1,
    "mixup": 0.0,
    "cutmix": 0.0,
    "mixup_off_epoch": 0,
    "train_interpolation": "random",
    "color_jitter": 0.4,
    "scale": [0.08, 1.0],
    "reprob": 0.0,
    "remode": "pixel",
    "model_ema_decay": 0.9998,
    "seed": 42,
    "workers": 4,
    "checkpoint_hist": 10,
    "eval_metric": "top1",
    "train_split": "train",
    "val_split": "validation",
    "kd_temperature": 4.0,
    "kd_model_name": None,
    "distill_loss_weight": None,
    "task_loss_weight": None,
}


# ------------------------------------------------------------------------------------------- real image folders


def _save_split(root, images_by_class, n_train):
    for label, images in images_by_class.items():
        for split, part in (("train", images[:n_train]), ("validation", images[n_train:])):
            os.makedirs(root / split / label, exist_ok=True)
            for i, image in enumerate(part):
                image.save(root / split / label / f"{i}.png")


@pytest.fixture(scope="module")
def gray_folder(tmp_path_factory):
    """An ImageFolder of real handwritten digits (scikit-learn's 8x8 scans, upsampled to 28x28 'L' PNGs):
    3 classes x (4 train + 2 validation)."""
    digits = datasets.load_digits()
    root = tmp_path_factory.mktemp("digits")
    by_class = {}
    for d in (0, 1, 7):
        scans = digits.images[digits.target == d][:6]
        by_class[str(d)] = [
            PIL.fromarray((s * 255 / 16).astype(np.uint8), mode="L").resize((28, 28), PIL.BICUBIC) for s in scans
        ]
    _save_split(root, by_class, n_train=4)
    return str(root)


@pytest.fixture(scope="module")
def rgb_folder(tmp_path_factory):
    """An ImageFolder of 32x32 RGB crops of scikit-learn's two sample photos (china.jpg, flower.jpg), one class
    per photo: 2 classes x (4 train + 2 validation)."""
    photos = datasets.load_sample_images()
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    by_class = {}
    for name, photo in zip(("china", "flower"), photos.images):
        crops = []
        for _ in range(6):
            y, x = rng.integers(0, photo.shape[0] - 96), rng.integers(0, photo.shape[1] - 96)
            crops.append(PIL.fromarray(photo[y : y + 96, x : x + 96]).resize((32, 32), PIL.BICUBIC))
        by_class[name] = crops
    _save_split(root, by_class, n_train=4)
    return str(root)


def _summary(out):
    with open(os.path.join(out["output_dir"], "summary.csv")) as f:
        return list(csv.DictReader(f))


def _checkpoint_args(out):
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(os.path.join(out["output_dir"], "last.pth.tar"), weights_only=True)["args"]


@pytest.fixture(scope="module")
def gray_cnn_run(gray_folder, tmp_path_factory):
    """The issue's grayscale command line: resnet18, one input channel, timm's defaults otherwise."""
    out_root = tmp_path_factory.mktemp("gray_cnn")
    argv = [gray_folder, "--model", "resnet18", "--num-classes", "3", "--in-chans", "1", "--input-size", "1", "28"]
    argv += ["28", *RUN, "--output", str(out_root), "--experiment", "cnn"]
    return main(argv)


@pytest.fixture(scope="module")
def rgb_vit_run(rgb_folder, tmp_path_factory):
    """A tiny RGB ViT, every setting in a ``-c`` YAML file (as timm users keep them)."""
    out_root = tmp_path_factory.mktemp("rgb_vit")
    config = out_root / "vit.yaml"
    settings = {
        "model": "vit_tiny_patch16_224",
        "model_kwargs": {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2},
        "img_size": 32,
        "num_classes": 2,
        "batch_size": 4,
        "epochs": 1,
        "warmup_epochs": 0,
        "workers": 0,
        "opt": "adamw",
        "lr_base": 0.004,
        "log_interval": 1,
        "experiment": "vit",
        "output": str(out_root),
    }
    config.write_text(yaml.safe_dump(settings))
    return main(["-c", str(config), rgb_folder])


# ------------------------------------------------------------------------------------------------- the parser


def test_defaults_are_timms():
    args = build_parser().parse_args([])
    assert {k: getattr(args, k) for k in TIMM_DEFAULTS} == TIMM_DEFAULTS


@pytest.mark.parametrize(
    "flags, world_size, expected",
    [
        (["--opt", "sgd", "-b", "128"], 1, 0.1 * 128 / 256),  # linear scaling for SGD
        (["--opt", "adamw", "-b", "64"], 1, 0.1 * math.sqrt(64 / 256)),  # sqrt scaling for ada*
        (["--opt", "lamb", "-b", "32", "--grad-accum-steps", "2"], 4, 0.1 * math.sqrt(256 / 256)),
        (["--opt", "adamw", "-b", "64", "--lr-base-scale", "linear", "--lr-base", "0.002"], 2, 0.002 * 128 / 256),
        (["--opt", "sgd", "-b", "64", "--lr-base-size", "64", "--lr-base", "0.5"], 1, 0.5),
        (["--opt", "adamw", "-b", "64", "--lr", "0.003"], 8, 0.003),  # an explicit --lr wins
    ],
)
def test_lr_is_derived_from_lr_base(flags, world_size, expected):
    args = parse_args(["data", *flags])
    assert args.lr == (0.003 if "--lr" in flags else None)
    assert resolve_lr(args, world_size=world_size, verbose=False) == pytest.approx(expected)
    assert args.lr == pytest.approx(expected)


def test_model_kwargs_take_timms_form_and_json():
    args = parse_args(["data", "--model-kwargs", "img_size=28", "patch_size=4", "global_pool=avg", "drop=0.1"])
    assert args.model_kwargs == {"img_size": 28, "patch_size": 4, "global_pool": "avg", "drop": 0.1}
    assert parse_args(["data", "--model-kwargs", '{"img_size": 32}']).model_kwargs == {"img_size": 32}
    args, text = parse_args_and_text(["data", "--model-kwargs", "img_size=(28,32)"])
    assert args.model_kwargs == {"img_size": (28, 32)}
    assert yaml.safe_load(text)["model_kwargs"] == {"img_size": [28, 32]}  # args.yaml takes tuples as lists
    assert parse_args(["data", "--opt-kwargs", "foreach=False"]).opt_kwargs == {"foreach": False}
    with pytest.raises(SystemExit):
        parse_args(["data", "--model-kwargs", "img_size"])


def test_config_file_sets_defaults_and_the_command_line_wins(tmp_path, caplog):
    config = tmp_path / "cfg.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": "resnet10t",
                "lr_base": 0.2,
                "batch_size": 32,
                "model_kwargs": {"drop_rate": 0.1},
                "kd_loss_type": "dkd",  # timm's name of --kd-loss
                "data_dir": "/from/yaml",
                "lr_decay_fn": "linear",  # no flag here, but timm's scheduler_kwargs reads it
            }
        )
    )
    args, text = parse_args_and_text(["-c", str(config), "--lr-base", "0.3", "--epochs", "7"])
    assert (args.model, args.lr_base, args.batch_size, args.epochs) == ("resnet10t", 0.3, 32, 7)
    assert args.model_kwargs == {"drop_rate": 0.1} and args.kd_loss == "dkd" and args.lr_decay_fn == "linear"
    assert args.data_dir == "/from/yaml" and args.lr is None
    assert "lr_decay_fn" in caplog.text  # reported as not a flag of this entry point
    saved = yaml.safe_load(text)  # args.yaml, as timm writes it: before --lr is derived
    assert saved["lr"] is None and saved["lr_base"] == 0.3 and saved["model"] == "resnet10t"
    with pytest.raises(SystemExit):
        parse_args(["--model", "resnet18"])  # no dataset folder anywhere


def test_input_img_mode_follows_the_channels():
    args = parse_args(["data"])
    assert resolve_input_img_mode(args, {"input_size": (1, 28, 28)}) == "L"
    assert resolve_input_img_mode(args, {"input_size": (3, 28, 28)}) == "RGB"
    args = parse_args(["data", "--input-img-mode", "RGB"])
    assert resolve_input_img_mode(args, {"input_size": (1, 28, 28)}) == "RGB"


def test_img_size_sizes_the_data_not_the_model(tmp_path):
    """``--img-size`` is not a ``create_model`` kwarg (ResNet has none); a fixed-size ViT that does not match the
    data size gets an error that names both flags."""
    from kd_plugins.integrations.timm.train import _build_student

    args = parse_args([str(tmp_path), "--model", "resnet10t", "--img-size", "28", "--num-classes", "3"])
    model, data_config, _ = _build_student(args, torch.device("cpu"), primary=False)
    assert data_config["input_size"] == (3, 28, 28) and model.eval()(torch.zeros(1, 3, 28, 28)).shape == (1, 3)
    vit = ["--model", "vit_tiny_patch16_224"]
    args = parse_args([str(tmp_path), *vit, "--img-size", "28", "--model-kwargs", *TINY_VIT])
    with pytest.raises(ValueError, match="built for 224x224 inputs but the data pipeline gives 28x28"):
        _build_student(args, torch.device("cpu"), primary=False)
    args = parse_args([str(tmp_path), *vit, "--model-kwargs", "img_size=28", *TINY_VIT])
    with pytest.raises(ValueError, match="--model-kwargs img_size=28 --img-size 28"):  # timm's data default: 224
        _build_student(args, torch.device("cpu"), primary=False)


def test_amp_defaults_to_float16_without_a_scaler_on_cpu():
    from kd_plugins.integrations.timm.train import _setup_amp

    autocast, scaler = _setup_amp(parse_args(["data", "--amp"]), torch.device("cpu"), primary=False)
    assert scaler is None and autocast.keywords["dtype"] == torch.float16


# ------------------------------------------------------------------------------------------------- end to end


def test_grayscale_cnn_trains_with_timms_flags(gray_cnn_run):
    out = gray_cnn_run
    assert out["best_metric"] is not None and math.isfinite(out["eval"]["loss"])
    args = _checkpoint_args(out)
    assert args.input_img_mode is None and args.lr == pytest.approx(0.1 * 4 / 256)  # timm's derivation, SGD
    with open(os.path.join(out["output_dir"], "args.yaml")) as f:
        saved = yaml.safe_load(f)
    assert saved["lr"] is None and saved["in_chans"] == 1 and saved["amp_dtype"] == "float16"
    # the saved args.yaml is itself a -c file
    again = parse_args(["-c", os.path.join(out["output_dir"], "args.yaml")])
    assert (again.model, again.in_chans, again.input_size, again.batch_size) == ("resnet18", 1, [1, 28, 28], 4)


def test_grayscale_vit_distils_from_the_cnn(gray_folder, gray_cnn_run, tmp_path):
    """A one-channel ViT student, the grayscale resnet18 checkpoint above as teacher (logits + features)."""
    teacher = os.path.join(gray_cnn_run["output_dir"], "last.pth.tar")
    argv = [gray_folder, "--model", "vit_tiny_patch16_224", "--model-kwargs", "img_size=28", "patch_size=7"]
    argv += [*TINY_VIT, "--num-classes", "3", "--input-size", "1", "28", "28", "--opt", "adamw", *RUN]
    argv += ["--kd-model-name", "resnet18", "--kd-teacher-checkpoint", teacher, "--kd-loss", "kl:1.0,hidden_mse:0.5"]
    argv += ["--kd-feature-pairs", "1=-1", "--output", str(tmp_path), "--experiment", "kd"]
    out = main(argv)
    assert out["best_metric"] is not None
    row = _summary(out)[0]
    assert float(row["train_kd_loss"]) > 0 and math.isfinite(float(row["train_loss"]))
    assert _checkpoint_args(out).lr == pytest.approx(0.1 * math.sqrt(4 / 256))  # sqrt scaling for adamw


def test_prockd_runs_from_the_command_line(gray_folder, gray_cnn_run, tmp_path):
    """--kd-method prockd: ProCKDTask from timm's flags (the teacher's head is never used, so its label space may
    differ; tests/test_prockd.py trains a 5-class student from a 10-class teacher)."""
    teacher = os.path.join(gray_cnn_run["output_dir"], "last.pth.tar")
    argv = [gray_folder, "--model", "resnet10t", "--num-classes", "3", "--in-chans", "1", "--input-size", "1", "28"]
    argv += ["28", *RUN, "--kd-model-name", "resnet18", "--kd-teacher-checkpoint", teacher]
    argv += ["--kd-method", "prockd", "--kd-prockd-prototypes", "4", "--kd-prockd-features=-3=-3"]
    argv += ["--output", str(tmp_path), "--experiment", "pk"]
    out = main(argv)
    assert out["best_metric"] is not None
    assert float(_summary(out)[0]["train_kd_loss"]) > 0
    with pytest.raises(SystemExit, match="needs --kd-model-name"):
        main([gray_folder, "--model", "resnet10t", "--num-classes", "3", *RUN, "--kd-method", "prockd"])


def test_several_teachers_from_the_command_line(gray_folder, gray_cnn_run, tmp_path):
    """Comma-separated --kd-model-name / --kd-teacher-checkpoint: a TeacherSet (weights, aggregation) in KDTask, each
    grayscale teacher normalised by its own channel-adapted mean/std."""
    teacher = os.path.join(gray_cnn_run["output_dir"], "last.pth.tar")
    argv = [gray_folder, "--model", "resnet10t", "--num-classes", "3", "--in-chans", "1", "--input-size", "1", "28"]
    argv += ["28", *RUN, "--kd-model-name", "resnet18,resnet18", "--kd-teacher-checkpoint", f"{teacher},{teacher}"]
    argv += ["--kd-teacher-weights", "0.3,0.7", "--kd-teacher-aggregation", "sum_of_divergences"]
    out = main([*argv, "--output", str(tmp_path), "--experiment", "set"])
    assert out["best_metric"] is not None
    assert float(_summary(out)[0]["train_kd_loss"]) > 0
    with pytest.raises(SystemExit, match="one trained checkpoint per teacher"):
        main([*argv[:-6], "--kd-teacher-checkpoint", teacher, "--output", str(tmp_path), "--experiment", "bad"])
    with pytest.raises(SystemExit, match="--kd-method kd only"):
        main([*argv, "--kd-method", "prockd", "--output", str(tmp_path), "--experiment", "bad2"])
    one = [*argv[:-8], "--kd-model-name", "resnet18", "--kd-teacher-checkpoint", teacher, "--kd-teacher-weights", "1"]
    with pytest.raises(SystemExit, match="apply to several teachers"):
        main([*one, "--output", str(tmp_path), "--experiment", "bad3"])


def test_rgb_vit_trains_from_a_config_file(rgb_vit_run):
    out = rgb_vit_run
    assert out["best_metric"] is not None and math.isfinite(out["eval"]["loss"])
    args = _checkpoint_args(out)
    assert args.config.endswith("vit.yaml") and args.model_kwargs["img_size"] == 32
    assert args.lr == pytest.approx(0.004 * math.sqrt(4 / 256))


def test_rgb_cnn_distils_from_the_vit(rgb_folder, rgb_vit_run, tmp_path):
    """An RGB CNN student, the ViT above as teacher (built through --kd-model-kwargs), explicit --lr."""
    teacher = os.path.join(rgb_vit_run["output_dir"], "last.pth.tar")
    argv = [rgb_folder, "--model", "resnet10t", "--num-classes", "2", "--img-size", "32", *RUN, "--lr", "0.01"]
    argv += ["--kd-model-name", "vit_tiny_patch16_224", "--kd-teacher-checkpoint", teacher]
    argv += ["--kd-model-kwargs", "img_size=32", "patch_size=8", *TINY_VIT, "--kd-loss", "dkd"]
    argv += ["--output", str(tmp_path), "--experiment", "kd"]
    out = main(argv)
    assert out["best_metric"] is not None
    assert float(_summary(out)[0]["train_kd_loss"]) > 0
    assert _checkpoint_args(out).lr == 0.01
