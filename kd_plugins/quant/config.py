"""``QuantConfig``: every option of :func:`~kd_plugins.quant.quantize`, parseable by ``HfArgumentParser``."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

from .._config import parse_mapping
from ._core import AUTO_ALPHA_METHODS, METHODS, check_alpha, check_method
from .dynamic import DEFAULT_FALLBACK, DEFAULT_FALLBACK_ROWS, DEFAULT_OUTLIER_THRESHOLD, FALLBACKS
from .layers import BACKENDS

__all__ = ["QuantConfig", "DEFAULT_METHOD", "DEFAULT_ALPHA", "DEFAULT_ALPHA_GRID", "MODES"]

#: The method of ``quantize(model)`` without ``method=``: the deployable method (real int8 GEMMs) with the lowest
#: perplexity on text of another domain than the calibration data in our measurements (SmolLM2-135M, Austen <-> BBC
#: News; benchmarks/quant/RESULTS_quant.md). It measures its column statistics on every call, so it needs no
#: calibration data.
DEFAULT_METHOD = "crossquant_dynamic_int8"

#: Default ``alpha`` per method. CrossQuant's 0.35 is our own choice (the paper's value could not be verified): it gave
#: the lowest validation perplexity of SmolLM2-135M in a sweep over 0.05..0.8 (Mansfield Park windows, calibration on
#: Emma; see benchmarks/quant/RESULTS_quant.md); on all-MiniLM-L6-v2 embedding agreement was flat between 0.35 and 0.8.
#: SmoothQuant's 0.5 is the migration strength of its reference implementation (0.65 was best on SmolLM2).
DEFAULT_ALPHA: dict[str, float | None] = {
    "crossquant_dynamic_int8": 0.35,
    "crossquant": 0.35,
    "crossquant_dynamic": 0.35,
    "smoothquant": 0.5,
    "per_token": None,
}

#: Alphas tried per layer by ``alpha="auto"`` (:func:`~kd_plugins.quant.calibrate_layer_alphas`).
DEFAULT_ALPHA_GRID = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)

MODES = ("int8", "fake")


def _parse_alpha(method: str, value):
    """``None`` | a float | ``"auto"`` | ``{layer: float}``, from a number, a dict or their string forms
    (``"0.4"``, ``"auto"``, ``'{"fc1": 0.3}'``, ``"fc1=0.3,fc2=0.5"``)."""
    if isinstance(value, str):
        text = value.strip()
        if text.lower() == "auto":
            if method not in AUTO_ALPHA_METHODS:
                raise ValueError(
                    f"alpha='auto' is calibrated per layer and applies to {AUTO_ALPHA_METHODS}, not {method!r}"
                )
            return "auto"
        if text.startswith("{") or "=" in text:
            return _parse_alpha(method, parse_mapping(text, "alpha", str))
        try:
            value = float(text)
        except ValueError:
            raise ValueError(
                f"alpha must be a number in [0, 1], 'auto' or a {{layer: alpha}} mapping, got {value!r}"
            ) from None
    if value is None:
        return None
    if isinstance(value, Mapping):
        if method == "per_token":
            raise ValueError("per_token has no alpha")
        return {str(k): check_alpha(method, v) for k, v in value.items()}
    return check_alpha(method, value)


def _parse_names(value, what: str) -> list[str]:
    """A list of names from a list / tuple or a comma-separated string (a single name stays one entry)."""
    if value is None:
        return []
    if isinstance(value, str):
        return [p.strip() for p in value.split(",") if p.strip()] if "," in value else [value]
    if isinstance(value, (list, tuple)):
        return list(value)
    raise TypeError(f"{what} must be a list of names or a comma-separated string, got {type(value).__name__}")


def _parse_grid(value) -> tuple[float, ...]:
    if isinstance(value, str):
        value = [p for p in value.split(",") if p.strip()]
    try:
        grid = tuple(float(a) for a in value)
    except (TypeError, ValueError):
        grid = ()
    if not grid or not all(0.0 <= a <= 1.0 for a in grid):
        raise ValueError(f"alpha_grid must be one or more numbers in [0, 1] (e.g. '0.2,0.4,0.6'), got {value!r}")
    return grid


@dataclass
class QuantConfig:
    """Options of W8A8 post-training quantization (:func:`~kd_plugins.quant.quantize`).

    Every field has a plain type for ``HfArgumentParser``; ``alpha``, ``skip`` and ``alpha_grid`` also accept their
    string forms, which ``__post_init__`` parses (``alpha="0.4"`` / ``"auto"`` / ``"fc1=0.3,fc2=0.5"``,
    ``skip="lm_head,layers.0"``, ``alpha_grid="0.2,0.4"``). ``alpha=None`` means :data:`DEFAULT_ALPHA` of the method
    (resolved when quantizing, so changing ``method`` keeps the right default).
    """

    method: str = field(
        default=DEFAULT_METHOD,
        metadata={
            "help": f"Quantization method, one of {METHODS}. Default {DEFAULT_METHOD!r}: column statistics measured "
            "on every call and folded into the weights per call (no calibration data needed)."
        },
    )
    alpha: float | str | dict | None = field(
        default=None,
        metadata={
            "help": "Method alpha in [0, 1]; 'auto' to choose it per layer on the calibration "
            f"data ({', '.join(AUTO_ALPHA_METHODS)}); or 'layer=alpha,...' / JSON for every "
            "quantized layer. Default: DEFAULT_ALPHA of the method."
        },
    )
    skip: list | str | None = field(
        default=None,
        metadata={
            "help": "Extra module names / globs to keep in float, comma-separated (e.g. 'lm_head,layers.0.mlp')."
        },
    )
    default_skip: bool = field(
        default=True,
        metadata={
            "help": "Also keep lm_head / output embeddings, classifier heads and modules under "
            "'*embed*' / '*norm*' names in float."
        },
    )
    mode: str = field(
        default="int8",
        metadata={"help": "'int8' (real int8 GEMMs) or 'fake' (dequantize + float matmul, for debugging)."},
    )
    backend: str = field(
        default="auto",
        metadata={
            "help": f"Int8 GEMM backend, one of {BACKENDS} ('auto': Triton on CUDA when available, else torch._int_mm)."
        },
    )
    min_calibration_rows: int = field(
        default=16, metadata={"help": "Fewest calibration rows (tokens / pixels) every layer must see."}
    )
    alpha_grid: tuple | str | None = field(
        default=DEFAULT_ALPHA_GRID, metadata={"help": "Alphas tried per layer by alpha='auto', comma-separated."}
    )
    fallback: str = field(
        default=DEFAULT_FALLBACK,
        metadata={
            "help": f"crossquant_dynamic_int8: what calls with fewer than fallback_rows rows (decode) run, one of "
            f"{FALLBACKS} ('weight_only': float activations x int8 weights; 'per_token': W8A8 per-token)."
        },
    )
    fallback_rows: int = field(
        default=DEFAULT_FALLBACK_ROWS,
        metadata={
            "help": "crossquant_dynamic_int8: calls with fewer rows (batch x tokens) than this use the fallback "
            "(0: never); the per-call weight requantization does not pay off below it."
        },
    )
    outlier_threshold: float = field(
        default=DEFAULT_OUTLIER_THRESHOLD,
        metadata={
            "help": "crossquant_dynamic_int8: input columns whose per-call abs-max exceeds this multiple of the median "
            "column abs-max (at most 1/64 of the columns) are multiplied in float with the int8 weights instead of "
            "being folded into them (0: none)."
        },
    )
    compile_quantizer: bool = field(
        default=False,
        metadata={"help": "crossquant_dynamic_int8: torch.compile the per-call quantization steps (fewer passes)."},
    )
    progress: bool = field(default=False, metadata={"help": "Show tqdm bars for calibration and conversion."})

    def __post_init__(self):
        check_method(self.method)
        self.alpha = _parse_alpha(self.method, self.alpha)
        self.skip = _parse_names(self.skip, "skip")
        self.alpha_grid = _parse_grid(DEFAULT_ALPHA_GRID if self.alpha_grid is None else self.alpha_grid)
        if self.mode not in MODES:
            raise ValueError(f"mode must be 'int8' or 'fake', got {self.mode!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.fallback not in FALLBACKS:
            raise ValueError(f"fallback must be one of {FALLBACKS}, got {self.fallback!r}")
        if isinstance(self.fallback_rows, bool) or not isinstance(self.fallback_rows, int) or self.fallback_rows < 0:
            raise ValueError(f"fallback_rows must be an int >= 0 (0: never fall back), got {self.fallback_rows!r}")
        if isinstance(self.outlier_threshold, bool) or not isinstance(self.outlier_threshold, (int, float)):
            raise ValueError(f"outlier_threshold must be a number >= 0, got {self.outlier_threshold!r}")
        if self.outlier_threshold < 0:
            raise ValueError(f"outlier_threshold must be >= 0 (0: no outlier columns), got {self.outlier_threshold!r}")
        if not isinstance(self.min_calibration_rows, int) or self.min_calibration_rows < 1:
            raise ValueError(f"min_calibration_rows must be an int >= 1, got {self.min_calibration_rows!r}")

    @property
    def resolved_alpha(self):
        """``alpha``, with ``None`` replaced by the method's :data:`DEFAULT_ALPHA`."""
        return DEFAULT_ALPHA[self.method] if self.alpha is None else self.alpha

    def to_dict(self) -> dict:
        return asdict(self)
