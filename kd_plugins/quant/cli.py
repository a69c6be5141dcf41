"""``kd-plugins quantize MODEL_DIR OUT_DIR [--method METHOD] [--calibration FILE] [--alpha A]``.

MODEL_DIR is a Hugging Face model directory (``config.json`` + weights + tokenizer, e.g. a student saved by the
distillation callback) or a timm directory (``config.json`` with ``architecture`` + ``model.safetensors`` /
``pytorch_model.bin``). FILE holds the calibration inputs:

* ``.txt``: one text per non-empty line; ``.jsonl``: one JSON object per line with a ``"text"`` field (or a string);
  ``.json``: a list of strings (texts need the model directory's tokenizer);
* ``.pt`` / ``.npy``: a tensor of model inputs stacked on dim 0 (token ids ``[N, S]`` or images ``[N, C, H, W]``).

The quantized checkpoint (plus the tokenizer) is written atomically to OUT_DIR and can be reloaded with
``kd_plugins.quant.load_quantized(OUT_DIR)``. Can also be run as ``python -m kd_plugins.quant.cli quantize ...``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from ._core import METHODS, STATIC_METHODS
from .api import quantize
from .config import DEFAULT_ALPHA, DEFAULT_METHOD, QuantConfig
from .dynamic import DEFAULT_FALLBACK, DEFAULT_FALLBACK_ROWS, DEFAULT_OUTLIER_THRESHOLD, FALLBACKS
from .report import KernelReport, quantization_kernel_report
from .serialization import QuantizedCheckpointError, save_quantized
from .targets import quantized_layers

__all__ = ["quantize_main", "build_parser", "quant_config_from_args"]


class CLIError(Exception):
    pass


def _alpha_arg(text: str):
    """``--alpha``: a number in [0, 1] or ``auto`` (per-layer calibrated)."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1] or 'auto', got {text!r}") from None


def build_parser(prog: str = "kd-plugins quantize") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="W8A8 post-training quantization of a HF or timm checkpoint.")
    p.add_argument("model_dir", metavar="MODEL_DIR", help="Hugging Face or timm model directory")
    p.add_argument("out_dir", metavar="OUT_DIR", help="where to write the quantized checkpoint")
    p.add_argument("--method", default=DEFAULT_METHOD, choices=METHODS, help=f"default {DEFAULT_METHOD}")
    p.add_argument(
        "--calibration",
        metavar="FILE",
        default=None,
        help="calibration inputs (.txt/.jsonl/.json texts or .pt/.npy tensor); required by "
        f"{', '.join(STATIC_METHODS)} (also used for the quantization-kernel report)",
    )
    defaults = ", ".join(f"{k}={v}" for k, v in DEFAULT_ALPHA.items() if v is not None)
    p.add_argument(
        "--alpha",
        type=_alpha_arg,
        default=None,
        help=f"method alpha, or 'auto' to choose it per layer on the calibration data ({defaults})",
    )
    p.add_argument(
        "--fallback",
        default=DEFAULT_FALLBACK,
        choices=FALLBACKS,
        help=f"{DEFAULT_METHOD}: what calls with fewer than --fallback-rows rows (decode) run",
    )
    p.add_argument(
        "--fallback-rows",
        type=int,
        default=DEFAULT_FALLBACK_ROWS,
        help=f"{DEFAULT_METHOD}: calls with fewer rows use --fallback (0: never; default {DEFAULT_FALLBACK_ROWS})",
    )
    p.add_argument(
        "--outlier-threshold",
        type=float,
        default=DEFAULT_OUTLIER_THRESHOLD,
        help=f"{DEFAULT_METHOD}: columns above this multiple of the median column abs-max run in float (0: none)",
    )
    p.add_argument("--skip", nargs="*", default=[], metavar="NAME", help="extra module names / globs to keep in float")
    p.add_argument(
        "--no-default-skip",
        action="store_true",
        help="also quantize lm_head / classifier heads (embeddings and norms are never linear)",
    )
    p.add_argument("--num-samples", type=int, default=128, help="calibration samples to use (default 128)")
    p.add_argument("--max-length", type=int, default=256, help="token limit per calibration text (default 256)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument(
        "--report-batches",
        type=int,
        default=4,
        help="calibration batches used for the quantization-kernel report (0 disables it)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


# ---------------------------------------------------------------------------------------------------- loading
def _load_model(model_dir: Path):
    cfg_path = model_dir / "config.json"
    if not model_dir.is_dir():
        raise CLIError(f"MODEL_DIR {model_dir} is not a directory")
    if (model_dir / "quant_config.json").is_file():
        raise CLIError(f"{model_dir} is already a quantized checkpoint")
    if not cfg_path.is_file():
        raise CLIError(f"{model_dir} has no config.json (expected a Hugging Face or timm model directory)")
    cfg = json.loads(cfg_path.read_text())
    if "architecture" in cfg and "model_type" not in cfg:
        import timm

        kwargs = dict(cfg.get("model_args", {}))
        if "num_classes" in cfg:
            kwargs.setdefault("num_classes", cfg["num_classes"])
        model = timm.create_model(cfg["architecture"], pretrained=False, **kwargs)
        st = model_dir / "model.safetensors"
        if st.is_file():
            from safetensors.torch import load_file

            sd = load_file(str(st))
        elif (model_dir / "pytorch_model.bin").is_file():
            sd = torch.load(model_dir / "pytorch_model.bin", map_location="cpu", weights_only=True)
        else:
            raise CLIError(f"{model_dir} has no model.safetensors or pytorch_model.bin")
        model.load_state_dict(sd)
        return model.eval(), None, {"img_size": kwargs["img_size"]} if "img_size" in kwargs else None
    import transformers

    archs = cfg.get("architectures") or []
    cls = getattr(transformers, archs[0], None) if archs else None
    if cls is None:
        cls = transformers.AutoModel
    model = cls.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    try:
        tok = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    except Exception:
        tok = None
    return model, tok, None


def _read_calibration(path: Path, tok, args) -> list:
    if not path.is_file():
        raise CLIError(f"calibration file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix in (".pt", ".npy"):
        if suffix == ".pt":
            t = torch.load(path, map_location="cpu", weights_only=True)
        else:
            import numpy as np

            t = torch.from_numpy(np.load(path))
        if not isinstance(t, torch.Tensor) or t.dim() < 1 or t.shape[0] == 0:
            raise CLIError(f"{path} must hold a non-empty tensor with samples on dim 0")
        t = t[: args.num_samples]
        return [t[i : i + args.batch_size] for i in range(0, t.shape[0], args.batch_size)]
    text = path.read_text(encoding="utf-8")
    if suffix == ".jsonl":
        texts = []
        for i, line in enumerate(text.splitlines()):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise CLIError(f"{path}:{i + 1}: invalid JSON ({e})") from None
            texts.append(obj if isinstance(obj, str) else obj.get("text", "") if isinstance(obj, dict) else "")
    elif suffix == ".json":
        texts = json.loads(text)
        if not isinstance(texts, list) or not all(isinstance(x, str) for x in texts):
            raise CLIError(f"{path} must be a JSON list of strings")
    else:
        texts = text.splitlines()
    texts = [t.strip() for t in texts if t and t.strip()][: args.num_samples]
    if not texts:
        raise CLIError(f"calibration file {path} holds no text")
    if tok is None:
        raise CLIError("text calibration needs a tokenizer in MODEL_DIR; pass a .pt/.npy tensor of inputs instead")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return [
        dict(
            tok(
                texts[i : i + args.batch_size],
                padding=True,
                truncation=True,
                max_length=args.max_length,
                return_tensors="pt",
            )
        )
        for i in range(0, len(texts), args.batch_size)
    ]


def _dir_bytes(d: Path, pattern: str = "*") -> int:
    return sum(p.stat().st_size for p in d.glob(pattern) if p.is_file())


def _mb(n: float) -> str:
    return f"{n / 2**20:.1f} MB"


# ---------------------------------------------------------------------------------------------------- main
def quant_config_from_args(args: argparse.Namespace) -> QuantConfig:
    """The :class:`QuantConfig` the command line asks for."""
    return QuantConfig(
        method=args.method,
        alpha=args.alpha,
        skip=args.skip or None,
        default_skip=not args.no_default_skip,
        fallback=args.fallback,
        fallback_rows=args.fallback_rows,
        outlier_threshold=args.outlier_threshold,
        progress=not args.quiet,
    )


def quantize_main(argv: list[str] | None = None) -> int:
    """Entry point of ``kd-plugins quantize``; returns the process exit code (0 ok, 2 bad input)."""
    args = build_parser().parse_args(argv)
    t0 = time.time()
    try:
        model_dir, out_dir = Path(args.model_dir), Path(args.out_dir)
        if out_dir.exists() and any(out_dir.iterdir()) and not args.overwrite:
            raise CLIError(f"OUT_DIR {out_dir} exists and is not empty (use --overwrite)")
        config = quant_config_from_args(args)
        model, tok, build_kwargs = _load_model(model_dir)
        calib = _read_calibration(Path(args.calibration), tok, args) if args.calibration else None
        if calib is None and config.method in STATIC_METHODS:
            raise CLIError(f"--method {config.method} needs --calibration FILE")
        quantize(model, config, calibration_data=calib)
        report = None
        if calib and args.report_batches > 0:
            report = quantization_kernel_report(model, calib[: args.report_batches], progress=config.progress)
        save_quantized(model, out_dir, tokenizer=tok, overwrite=args.overwrite, build_kwargs=build_kwargs)
    except (CLIError, ValueError, TypeError, FileNotFoundError, FileExistsError, QuantizedCheckpointError) as e:
        print(f"kd-plugins quantize: error: {e}", file=sys.stderr)
        return 2
    _print_summary(model, report, model_dir, out_dir, time.time() - t0)
    return 0


def _layer_bytes(q) -> tuple[int, int]:
    """(fp32 bytes of the original layer, bytes of its int8 replacement)."""
    bias = q.bias.numel() if q.bias is not None else 0
    fp32 = (q.in_features * q.out_features + bias) * 4
    side = q.weight_scale.numel() + (q.act_inv_col.numel() if q.act_inv_col is not None else 0) + bias
    return fp32, q.weight_int8.numel() + 4 * side


def _alpha_text(info: dict) -> str:
    alpha = info["alpha"]
    text = "" if alpha is None else (f", alpha={alpha:g}" if isinstance(alpha, float) else f", alpha={alpha}")
    if isinstance(info.get("layer_alpha"), dict):
        vals = sorted(info["layer_alpha"].values())
        text += f" (per layer: min {vals[0]:g}, median {vals[len(vals) // 2]:g}, max {vals[-1]:g})"
    return text


def _print_summary(model, report: KernelReport | None, model_dir: Path, out_dir: Path, seconds: float) -> None:
    """Sizes and quantization kernels per group of layers (the name after the last numeric component)."""
    layers = quantized_layers(model)
    sizes = {n: _layer_bytes(q) for n, q in layers.items()}
    groups: dict[str, list[str]] = {}
    for name in layers:
        parts = name.split(".")
        idx = max((i for i, p in enumerate(parts) if p.isdigit()), default=-1)
        groups.setdefault(".".join(parts[idx + 1 :]) or name, []).append(name)
    kern = {l.name: l for l in report.layers} if report is not None else {}
    info = model.kd_quantization
    print(
        f"\nQuantized {model_dir} -> {out_dir}  (method={info['method']}"
        + _alpha_text(info)
        + f", {len(layers)} layers, {seconds:.1f}s)\n"
    )
    print("| layers | n | fp32 | int8 | kernel | per-token kernel |")
    print("|---|---|---|---|---|---|")
    for key, names in groups.items():
        el = sum(kern[n].elements for n in names if n in kern)
        k = f"{100 * sum(kern[n].zeros for n in names if n in kern) / el:.2f}%" if el else "-"
        pk = f"{100 * sum(kern[n].per_token_zeros for n in names if n in kern) / el:.2f}%" if el else "-"
        print(
            f"| {key} | {len(names)} | {_mb(sum(sizes[n][0] for n in names))} | "
            f"{_mb(sum(sizes[n][1] for n in names))} | {k} | {pk} |"
        )
    tk = f"{100 * report.kernel:.2f}%" if report is not None else "-"
    tpk = f"{100 * report.per_token_kernel:.2f}%" if report is not None else "-"
    print(
        f"| **all** | {len(layers)} | {_mb(sum(s[0] for s in sizes.values()))} | "
        f"{_mb(sum(s[1] for s in sizes.values()))} | {tk} | {tpk} |"
    )
    fp_files = _dir_bytes(model_dir, "*.safetensors") or _dir_bytes(model_dir, "*.bin")
    print(
        f"\ncheckpoint: {_mb(_dir_bytes(out_dir, '*.safetensors'))} (float model files: {_mb(fp_files)}); "
        f"skipped in float: {len(info['skipped'])} linear layer(s)"
    )


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "quantize":
        argv = argv[1:]
    return quantize_main(argv)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
