"""W8A8 post-training quantization with real int8 matmuls: CrossQuant, per-token and SmoothQuant in one call.

>>> from kd_plugins.quant import quantize, save_quantized, load_quantized, quantization_kernel_report
>>> model = quantize(model)                     # DEFAULT_METHOD: dynamic CrossQuant on int8 GEMMs, no calibration
>>> model = quantize(model, method="crossquant", calibration_data=batches)   # alpha defaults to DEFAULT_ALPHA
>>> model = quantize(model, QuantConfig(method="smoothquant", alpha=0.6), calibration_data=batches)
>>> report = quantization_kernel_report(model, batches); print(report.to_table())
>>> save_quantized(model, "out/"); model2 = load_quantized("out/")
>>> model3 = AutoModelForCausalLM.from_pretrained("out/")   # Hugging Face models, after `import kd_plugins`

``load_quantized`` and ``from_pretrained`` both verify every tensor against the SHA-256 checksums of
``quant_config.json`` and restore bit-identical outputs; see :mod:`kd_plugins.quant.hf_quantizer` for what the
``from_pretrained`` path does and does not check (other ``dtype=``, Hub repos without ``quant_config.json``).

CrossQuant (Liu et al., arXiv 2410.07505) quantizes activation element ``(i, j)`` with step
``t_i^alpha * c_j^(1-alpha) / 127`` (``t``: row abs-max, ``c``: column abs-max), which shrinks the *quantization
kernel* (elements rounded to 0). ``method="crossquant_dynamic_int8"`` (the default) measures ``c`` on every call and
folds ``c^(1-alpha)`` into a per-call requantized int8 weight (:mod:`kd_plugins.quant.dynamic`); ``"crossquant"``
calibrates ``c`` once and folds it into the stored weights; ``"crossquant_dynamic"`` is the fake-quant reference of the
paper's form for accuracy studies.
"""

from ._core import METHODS
from .api import quantize
from .calibration import LayerAlphaSearch, LayerStats, calibrate_layer_alphas, collect_activation_stats
from .config import DEFAULT_ALPHA, DEFAULT_ALPHA_GRID, DEFAULT_METHOD, QuantConfig
from .layers import QuantizedLinear
from .report import AlphaSweep, KernelReport, LayerKernel, quantization_kernel_report, sweep_alpha
from .serialization import QuantizedCheckpointError, load_quantized, save_quantized
from .targets import find_quantizable, quantized_layers

__all__ = [
    "METHODS",
    "DEFAULT_METHOD",
    "DEFAULT_ALPHA",
    "QuantConfig",
    "quantize",
    "QuantizedLinear",
    "quantization_kernel_report",
    "KernelReport",
    "LayerKernel",
    "sweep_alpha",
    "AlphaSweep",
    "calibrate_layer_alphas",
    "LayerAlphaSearch",
    "DEFAULT_ALPHA_GRID",
    "collect_activation_stats",
    "LayerStats",
    "find_quantizable",
    "quantized_layers",
    "save_quantized",
    "load_quantized",
    "QuantizedCheckpointError",
]
