"""Register the kd_plugins W8A8 quantizer with transformers without importing transformers eagerly.

``import kd_plugins`` must stay cheap (transformers' quantizer registry pulls in most of transformers, ~3 s), yet
``AutoModel*.from_pretrained(dir)`` of a :func:`kd_plugins.quant.save_quantized` checkpoint should work after a plain
``import kd_plugins``. So: if ``transformers.quantizers.auto`` is already imported we register right away; otherwise a
one-shot post-import hook registers the moment transformers imports that module (``transformers.modeling_utils``
imports it, i.e. before any ``from_pretrained`` can run). Anything going wrong here (a transformers version without
``register_quantizer``, an API change) only disables the ``from_pretrained`` path: it never breaks importing
transformers or kd_plugins, and :func:`kd_plugins.quant.load_quantized` keeps working.
"""

from __future__ import annotations

import importlib.abc
import logging
import sys
from collections.abc import Callable

_TARGET = "transformers.quantizers.auto"
_logger = logging.getLogger("kd_plugins.quant")
#: The registration function given to :func:`install` (``kd_plugins.quant.hf_quantizer.register``, passed in by the
#: package ``__init__`` so that this bottom-layer module never imports ``kd_plugins.quant`` itself).
_REGISTER: list[Callable[[], bool]] = []


def _register_now() -> bool:
    try:
        return bool(_REGISTER and _REGISTER[0]())
    except Exception as e:  # noqa: BLE001 - never break the host import
        _logger.debug("kd_plugins: transformers quantizer registration unavailable (%s: %s)", type(e).__name__, e)
        return False


class _PostImportHook(importlib.abc.MetaPathFinder):
    """Finds nothing itself; wraps the real loader of ``transformers.quantizers.auto`` to register after it ran."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != _TARGET:
            return None
        spec = None
        for finder in list(sys.meta_path):
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            try:
                spec = finder.find_spec(fullname, path, target)
            except Exception:  # noqa: BLE001
                spec = None
            if spec is not None:
                break
        _uninstall()
        loader = getattr(spec, "loader", None)
        if spec is None or loader is None or not hasattr(loader, "exec_module"):
            return spec
        original = loader.exec_module

        def exec_module(module, _original=original):
            _original(module)
            _register_now()

        try:
            loader.exec_module = exec_module  # per-module loader instance (SourceFileLoader & co.)
        except Exception:  # noqa: BLE001 - immutable loader: give up quietly
            pass
        return spec


_HOOK = _PostImportHook()


def _uninstall() -> None:
    try:
        while _HOOK in sys.meta_path:
            sys.meta_path.remove(_HOOK)
    except ValueError:
        pass


def install(register: Callable[[], bool]) -> None:
    """Call ``register`` now if transformers' quantizer registry is loaded, else arm the one-shot post-import hook
    that calls it right after transformers imports that registry. ``register`` returns whether it registered."""
    _REGISTER[:] = [register]
    if _TARGET in sys.modules:
        _register_now()
    elif _HOOK not in sys.meta_path:
        sys.meta_path.insert(0, _HOOK)
