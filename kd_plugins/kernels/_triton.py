"""The one place that decides whether Triton kernels can run: package presence and Triton's CPU interpreter.

Importing this module never imports ``triton`` (an optional dependency).

``TRITON_INTERPRET`` is read with Triton's own rule (``getenv_bool`` in ``triton._C.libtriton``, used by
``triton.knobs.runtime.interpret`` and hence by ``triton.jit``): the interpreter is on when the value, lower-cased, is
exactly one of ``1``, ``y``, ``yes``, ``on``, ``true``; anything else (``0``, ``false``, ``off``, empty, ``" 1"``)
is off. Using the same rule matters: ``triton.jit`` fixes the mode when a kernel is defined, and a kernel wrapper
that disagrees would pick CPU launch sizes for compiled GPU kernels or the reverse.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

__all__ = ["INTERPRET_ENV", "TRUTHY_VALUES", "interpreter_enabled", "triton_available"]

#: The environment variable Triton reads to run kernels in its (CPU, slow) interpreter.
INTERPRET_ENV = "TRITON_INTERPRET"
#: Values (compared lower-cased, without stripping) that Triton treats as "on" (``triton._C.libtriton.getenv_bool``).
TRUTHY_VALUES = frozenset({"1", "y", "yes", "on", "true"})


def interpreter_enabled() -> bool:
    """True when ``TRITON_INTERPRET`` turns Triton's interpreter on, by Triton's own rule (see the module docstring).

    Triton decides when it is first imported, so the variable must be set before that.
    """
    return os.environ.get(INTERPRET_ENV, "").lower() in TRUTHY_VALUES


@functools.cache
def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_available(device: torch.device | str | None = None) -> bool:
    """Whether the optional ``triton`` package is installed; with ``device``, whether kernels can run there.

    Without ``device`` the package is only looked up, not imported (cheap, and leaves the interpreter decision
    open). With ``device`` triton is imported (the caller is about to launch a kernel) and the answer is True under
    the interpreter (:func:`interpreter_enabled`), else only for a CUDA ``device`` on a machine with CUDA.
    """
    if device is None:
        return importlib.util.find_spec("triton") is not None
    if not _triton_importable():
        return False
    if interpreter_enabled():
        return True
    return torch.cuda.is_available() and torch.device(device).type == "cuda"
