"""One checkpoint format for every kd_plugins artifact (quantized models, ACM models, SkillPacks).

A checkpoint is a directory published atomically (:func:`atomic_dir`) holding one safetensors file, a JSON manifest
and, for Hugging Face models, ``config.json`` (+ tokenizer files). The manifest schema is the same for every kind::

    {
      "format": "kd_plugins.checkpoint",
      "schema_version": 2,
      "kind": "quant" | "acm" | "skillpack" | ...,
      "kd_plugins_version": "0.1.0",
      "tensor_file": "model.safetensors", "tensor_file_bytes": 12345,
      "tensors": {name: {"dtype": "int8", "shape": [4, 8], "sha256": "..."}},   # one entry per stored tensor
      "aliases": {name: stored name},          # tensors sharing storage (tied weights) are stored once
      "architecture": {"kind": "hf" | "timm" | "torch", ...} | null,   # see architecture_record()
      "metadata": {...}                         # free-form, owned by the method that wrote the checkpoint
    }

Schema version 1 is the per-kind layout written before this module existed (``format: "kd_plugins.quant"`` /
``"kd_plugins.acm"`` / ``"kd_plugins.skillpack"`` with the method fields at the top level); :func:`read_manifest`
converts it, so old checkpoints keep loading.

Hugging Face checkpoints of kinds that transformers cannot rebuild by itself (quantized, ACM) carry a load guard in
``config.json`` (:data:`HF_LOAD_GUARD_KEY`, see :func:`write_checkpoint`): plain ``from_pretrained`` then raises an
error that names the kd_plugins loader instead of initialising the replaced layers at random.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import tempfile
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

__all__ = [
    "SCHEMA_FORMAT",
    "SCHEMA_VERSION",
    "HF_LOAD_GUARD_KEY",
    "CheckpointError",
    "MissingCheckpointFileError",
    "CheckpointSpec",
    "Checkpoint",
    "atomic_dir",
    "publish_dir",
    "apply_umask",
    "fsync_tree",
    "tensor_sha256",
    "dedupe_shared_tensors",
    "architecture_record",
    "rebuild_model",
    "check_output_dir",
    "write_checkpoint",
    "read_manifest",
    "read_checkpoint",
]

SCHEMA_FORMAT = "kd_plugins.checkpoint"
SCHEMA_VERSION = 2
#: Manifest keys shared by every kind; everything else of a version-1 manifest is method metadata.
_COMMON_KEYS = (
    "format",
    "format_version",
    "version",
    "kind",
    "architecture",
    "tensors",
    "aliases",
    "checksums",
    "file_bytes",
)


#: ``config.json`` key holding the load guard. transformers (>= 4.53) reads it as the name of the weights file and
#: refuses any value that is not a ``.safetensors`` name with a ``ValueError`` that quotes the value, so a sentence
#: naming the kd_plugins loader turns "warning + layers initialised at random" into an error that says what to do.
#: Loaders that know the kind drop it (:func:`rebuild_model`, the W8A8 quantizer) before transformers reads it.
HF_LOAD_GUARD_KEY = "transformers_weights"


class CheckpointError(ValueError):
    """A directory is not a valid checkpoint of the expected kind (corrupt, edited, newer, other kind...)."""


class MissingCheckpointFileError(CheckpointError, FileNotFoundError):
    """The checkpoint directory, its manifest or its tensor file does not exist."""


@dataclass(frozen=True)
class CheckpointSpec:
    """What one kind of checkpoint looks like on disk, and which errors its reader raises.

    ``description`` completes "not ..." in error messages (``"an ACM checkpoint"``); ``writer`` names the function
    that writes it (for hints); ``legacy_format`` is the ``format`` of its version-1 manifests; ``hf_load_guard``,
    when set, is the message plain ``from_pretrained`` raises on this kind's ``config.json`` (it must not end in
    ``.safetensors``; see :data:`HF_LOAD_GUARD_KEY`).
    """

    kind: str
    manifest_name: str
    tensor_file: str = "model.safetensors"
    description: str = "a kd_plugins checkpoint"
    writer: str = "kd_plugins"
    legacy_format: str | None = None
    hf_load_guard: str | None = None
    error: type[Exception] = CheckpointError
    missing_error: type[Exception] = MissingCheckpointFileError


# --------------------------------------------------------------------------------------- atomic publication
def apply_umask(d: Path) -> None:
    """``mkdtemp`` creates a 0700 directory: give the checkpoint the permissions a plain ``mkdir`` would have."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(d, 0o777 & ~mask)
    for p in d.rglob("*"):
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


def publish_dir(tmp: Path, out: Path) -> None:
    """Move the completed temporary directory ``tmp`` to ``out`` with ``os.replace``.

    An existing non-empty ``out`` is first renamed aside and removed only after the new directory is in place, so a
    crash at any point leaves either the old or the new checkpoint complete, never a mix.
    """
    apply_umask(tmp)
    if out.exists() and any(out.iterdir()):
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)


def fsync_tree(d: Path) -> None:
    """Flush every file below ``d`` to disk before the directory is published."""
    for p in d.rglob("*"):
        if p.is_file():
            with open(p, "rb") as fh:
                os.fsync(fh.fileno())


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike) -> Iterator[Path]:
    """Write a checkpoint directory atomically: yields a temporary sibling of ``out`` to fill; on normal exit its
    files are fsynced and it replaces ``out`` (:func:`publish_dir`); on any error it is removed and ``out`` is left
    as it was. Callers decide beforehand whether an existing ``out`` may be replaced."""
    out = Path(out).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        fsync_tree(tmp)
        publish_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ------------------------------------------------------------------------------------------------------- hashing
def tensor_sha256(t: torch.Tensor) -> str:
    """SHA-256 of the raw bytes of ``t`` (CPU, contiguous, row-major); dtype and shape are not hashed."""
    t = t.detach().cpu().contiguous().reshape(-1)
    if t.numel() == 0:
        return hashlib.sha256(b"").hexdigest()
    return hashlib.sha256(t.view(torch.uint8).numpy().tobytes()).hexdigest()


def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).replace("torch.", "")


def dedupe_shared_tensors(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Split ``state`` into ``(tensors, aliases)``: tensors sharing storage (tied embeddings / ``lm_head``) are kept
    once, under their first name, as CPU contiguous copies; ``aliases`` maps every other name to the kept one."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, t in state.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype, t.device)
        if key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = t.detach().cpu().contiguous()
    return tensors, aliases


# -------------------------------------------------------------------------------------------------- architecture
def _is_hf_model(model: nn.Module) -> bool:
    # isinstance without importing transformers: a PreTrainedModel can only exist once modeling_utils is loaded.
    modeling_utils = sys.modules.get("transformers.modeling_utils")
    base = getattr(modeling_utils, "PreTrainedModel", None)
    return isinstance(base, type) and isinstance(model, base)


def architecture_record(model: nn.Module, build_kwargs: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """How to rebuild ``model``'s architecture without its weights (stored in the manifest):

    * ``{"kind": "hf", "class": "LlamaForCausalLM"}`` for a transformers ``PreTrainedModel`` (the config itself is
      the ``config.json`` saved next to the manifest);
    * ``{"kind": "timm", "name": ..., "kwargs": {"num_classes": ..., **build_kwargs}}`` for a timm model (class
      defined in ``timm.*`` with ``pretrained_cfg["architecture"]``); ``build_kwargs`` are the extra
      ``timm.create_model`` arguments the architecture needs (e.g. ``img_size``);
    * ``{"kind": "torch", "class": "module.QualName"}`` otherwise (the loader then needs an instance: ``model=``).
    """
    if _is_hf_model(model):
        return {"kind": "hf", "class": type(model).__name__}
    pcfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    if type(model).__module__.startswith("timm.") and isinstance(pcfg, Mapping) and pcfg.get("architecture"):
        kwargs: dict[str, Any] = {}
        if getattr(model, "num_classes", None) is not None:
            kwargs["num_classes"] = int(model.num_classes)
        kwargs.update(build_kwargs or {})
        return {"kind": "timm", "name": pcfg["architecture"], "kwargs": kwargs}
    return {"kind": "torch", "class": f"{type(model).__module__}.{type(model).__qualname__}"}


def rebuild_model(
    record: Mapping[str, Any], config_dir: str | os.PathLike | None = None, *, error: type[Exception] = CheckpointError
) -> nn.Module:
    """A freshly initialized float model of the architecture ``record`` describes (:func:`architecture_record`).

    Hugging Face models are built from the ``config.json`` in ``config_dir`` (without any ``quantization_config``:
    the skeleton is the float model); timm models with ``timm.create_model(name, pretrained=False, **kwargs)``.
    Plain torch models cannot be rebuilt: ``error`` asks for ``model=``.
    """
    kind = record.get("kind")
    if kind == "hf":
        import transformers

        cls = getattr(transformers, str(record.get("class")), None)
        if cls is None:
            raise error(f"transformers has no class {record.get('class')!r}; pass model= to the loader")
        if config_dir is None:
            raise error("rebuilding a Hugging Face model needs the directory holding its config.json")
        config = transformers.AutoConfig.from_pretrained(str(config_dir))
        for key in ("quantization_config", HF_LOAD_GUARD_KEY):  # the skeleton is the plain float model
            if key in vars(config):
                delattr(config, key)
        return cls(config)
    if kind == "timm":
        import timm

        kwargs = {k: v for k, v in (record.get("kwargs") or {}).items() if v is not None}
        return timm.create_model(record["name"], pretrained=False, **kwargs)
    raise error(
        f"the checkpoint was saved from a plain torch model ({record.get('class')}), which cannot be rebuilt "
        "by itself: pass an instance of that architecture as model="
    )


# ------------------------------------------------------------------------------------------------------- writing
def check_output_dir(out_dir: str | os.PathLike, overwrite: bool) -> Path:
    """``out_dir`` as an absolute path, after refusing a file or (unless ``overwrite``) a non-empty directory."""
    out = Path(out_dir).absolute()
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; pass overwrite=True to replace it")
    return out


def _kd_plugins_version() -> str | None:
    # Read from the already-imported package instead of importing it (this module sits below it in the layers).
    return getattr(sys.modules.get(__name__.rpartition(".")[0]), "__version__", None)


def write_checkpoint(
    spec: CheckpointSpec,
    out_dir: str | os.PathLike,
    tensors: Mapping[str, torch.Tensor],
    *,
    architecture: Mapping[str, Any] | None,
    metadata: Mapping[str, Any],
    aliases: Mapping[str, str] | None = None,
    hf_config: Any = None,
    tokenizer: Any = None,
    overwrite: bool = False,
) -> Path:
    """Write ``tensors`` (one safetensors file) and the manifest of ``spec`` to ``out_dir`` atomically.

    Everything goes to a temporary sibling directory that replaces ``out_dir`` only when complete; an existing
    non-empty ``out_dir`` is refused unless ``overwrite``. ``hf_config`` / ``tokenizer`` (Hugging Face objects with
    ``save_pretrained``) are written next to the weights. Pass ``tensors`` without shared storage
    (:func:`dedupe_shared_tensors`) and the dropped names as ``aliases``. ``config.json`` gets ``spec.hf_load_guard``
    (:data:`HF_LOAD_GUARD_KEY`). Returns the absolute ``out_dir``.
    """
    from safetensors.torch import save_file

    out = check_output_dir(out_dir, overwrite)
    tensors = {n: t.detach().cpu().contiguous() for n, t in tensors.items()}
    manifest: dict[str, Any] = {
        "format": SCHEMA_FORMAT,
        "schema_version": SCHEMA_VERSION,
        "kind": spec.kind,
        "kd_plugins_version": _kd_plugins_version(),
        "tensor_file": spec.tensor_file,
        "tensor_file_bytes": None,
        "tensors": {
            n: {"dtype": _dtype_name(t), "shape": list(t.shape), "sha256": tensor_sha256(t)} for n, t in tensors.items()
        },
        "aliases": dict(aliases or {}),
        "architecture": dict(architecture) if architecture is not None else None,
        "metadata": dict(metadata),
    }
    with atomic_dir(out) as tmp:
        producer = {"format": "pt", "producer": f"kd_plugins.{spec.kind}"}
        save_file(tensors, str(tmp / spec.tensor_file), metadata=producer)
        manifest["tensor_file_bytes"] = (tmp / spec.tensor_file).stat().st_size
        if hf_config is not None:
            hf_config.save_pretrained(tmp)
            if spec.hf_load_guard:
                _add_load_guard(tmp / "config.json", spec.hf_load_guard)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / spec.manifest_name).write_text(json.dumps(manifest, indent=1))
    return out


def write_model_checkpoint(
    spec: CheckpointSpec,
    directory: str | os.PathLike,
    model: nn.Module,
    metadata: Mapping[str, Any],
    *,
    tokenizer=None,
    build_kwargs: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """:func:`write_checkpoint` of a whole model whose architecture a method changed (ACM, MoE): every weight (tied
    ones stored once), its ``architecture_record``, the method's ``metadata``, and for HF models ``config.json``
    with the load guard plus the ``tokenizer`` files when given."""
    tensors, aliases = dedupe_shared_tensors(model.state_dict())
    arch = architecture_record(model, build_kwargs)
    return write_checkpoint(
        spec,
        directory,
        tensors,
        aliases=aliases,
        architecture=arch,
        metadata=dict(metadata),
        hf_config=model.config if arch["kind"] == "hf" else None,
        tokenizer=tokenizer,
        overwrite=overwrite,
    )


def check_state_fits(model: nn.Module, flat: Mapping[str, torch.Tensor], what: str) -> None:
    """``flat`` has exactly the keys and shapes of ``model``'s state dict; the error names what differs and says to
    load the ``what`` checkpoint (e.g. "ACM", "MoE") into the architecture it was saved from."""
    own = model.state_dict()
    missing = sorted(set(own) - set(flat))
    unexpected = sorted(set(flat) - set(own))
    shape = sorted(n for n in set(own) & set(flat) if tuple(own[n].shape) != tuple(flat[n].shape))
    if not (missing or unexpected or shape):
        return
    parts = [f"missing in checkpoint: {missing[:5]}"] if missing else []
    if unexpected:
        parts.append(f"not in model: {unexpected[:5]}")
    if shape:
        parts.append(
            "shape mismatch: " + ", ".join(f"{n} {tuple(flat[n].shape)} vs {tuple(own[n].shape)}" for n in shape[:5])
        )
    raise ValueError(
        f"the {what} checkpoint does not fit this model (" + "; ".join(parts) + "): load it into the architecture "
        f"and {what} layout it was saved from"
    )


def _add_load_guard(config_file: Path, guard: str) -> None:
    # Written into the JSON, not set on the config: PreTrainedConfig.save_pretrained drops this key on purpose.
    if guard.endswith((".safetensors", ".safetensors.index.json", ".bin")):
        raise ValueError(f"a load guard must not name a weights file: {guard!r}")
    config = json.loads(config_file.read_text())
    config[HF_LOAD_GUARD_KEY] = guard
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


# ------------------------------------------------------------------------------------------------------- reading
@dataclass
class Checkpoint:
    """A checkpoint read by :func:`read_checkpoint`: its (schema 2) manifest and the stored tensors."""

    directory: Path
    manifest: dict[str, Any]
    tensors: dict[str, torch.Tensor] = field(repr=False)

    @property
    def metadata(self) -> dict[str, Any]:
        return self.manifest["metadata"]

    @property
    def architecture(self) -> dict[str, Any] | None:
        return self.manifest["architecture"]

    @property
    def aliases(self) -> dict[str, str]:
        return self.manifest["aliases"]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Stored tensors plus every alias (pointing at the same tensor object)."""
        full = dict(self.tensors)
        for alias, src in self.aliases.items():
            full[alias] = self.tensors[src]
        return full


def _upgrade_v1(spec: CheckpointSpec, old: dict[str, Any]) -> dict[str, Any]:
    """A version-1 manifest (per-kind layout) in the schema-2 form."""
    tensors = old.get("tensors")
    if tensors is None and isinstance(old.get("checksums"), dict):  # SkillPack v1: sha256 only
        tensors = {n: {"sha256": s} for n, s in old["checksums"].items()}
    return {
        "format": SCHEMA_FORMAT,
        "schema_version": 1,
        "kind": spec.kind,
        "kd_plugins_version": None,
        "tensor_file": spec.tensor_file,
        "tensor_file_bytes": old.get("file_bytes"),
        "tensors": tensors,
        "aliases": old.get("aliases", {}),
        "architecture": old.get("architecture"),
        "metadata": {k: v for k, v in old.items() if k not in _COMMON_KEYS},
    }


def read_manifest(spec: CheckpointSpec, directory: str | os.PathLike) -> dict[str, Any]:
    """The manifest of the checkpoint in ``directory``, checked and in the schema-2 form (version 1 is upgraded).

    Raises ``spec.missing_error`` for a missing directory or manifest and ``spec.error`` for invalid JSON, another
    kind, a newer schema version or a malformed table.
    """
    d = Path(directory)
    path = d / spec.manifest_name
    if not d.is_dir():
        raise MissingCheckpointFileError(f"{d} is not a directory, so it is not {spec.description}")
    if not path.is_file():
        raise spec.missing_error(
            f"{d} has no {spec.manifest_name}: it is not {spec.description} (write one with {spec.writer})"
        )
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise spec.error(f"{path} is not valid JSON ({e}); the checkpoint is corrupt") from None
    if not isinstance(manifest, dict):
        raise spec.error(f"{path} is not a JSON object; the checkpoint is corrupt")
    fmt = manifest.get("format")
    if fmt == SCHEMA_FORMAT:
        if manifest.get("kind") != spec.kind:
            raise spec.error(f"{path} describes a {manifest.get('kind')!r} checkpoint, not {spec.description}")
        version, known = manifest.get("schema_version"), SCHEMA_VERSION
    elif spec.legacy_format is not None and fmt == spec.legacy_format:
        # the per-kind layouts only ever had version 1; their successor is this schema
        version, known = manifest.get("format_version", manifest.get("version", 1)), 1
    else:
        raise spec.error(f"{path}: format is {fmt!r}: not {spec.description}")
    if not isinstance(version, int) or isinstance(version, bool):
        raise spec.error(f"{path}: malformed schema version {version!r}")
    if version > known:
        raise spec.error(
            f"{path}: schema version {version} is newer than this kd_plugins ({known}); upgrade kd_plugins"
        )
    if fmt != SCHEMA_FORMAT:
        manifest = _upgrade_v1(spec, manifest)
    for key, kind in (("tensors", dict), ("aliases", dict), ("metadata", dict)):
        if not isinstance(manifest.get(key), kind):
            raise spec.error(f"{path}: missing or malformed {key!r}")
    return manifest


def _check_tensor_table(spec: CheckpointSpec, wpath: Path, manifest: dict, tensors: dict, verify: bool) -> None:
    expected = manifest["tensors"]
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise spec.error(
            f"{wpath} does not match {spec.manifest_name}: missing tensors {missing[:5]}, unexpected "
            f"tensors {extra[:5]}"
        )
    bad_shape = []
    for name, meta in expected.items():
        t = tensors[name]
        if "shape" in meta and (list(t.shape) != list(meta["shape"]) or _dtype_name(t) != meta["dtype"]):
            bad_shape.append(
                f"{name}: file {tuple(t.shape)} {_dtype_name(t)}, manifest {tuple(meta['shape'])} {meta['dtype']}"
            )
    if bad_shape:
        raise spec.error(f"tensor shape/dtype mismatch in {wpath}: " + "; ".join(bad_shape[:5]))
    for alias, src in manifest["aliases"].items():
        if src not in tensors:
            raise spec.error(f"alias {alias!r} points to {src!r}, which is not in {wpath.name}")
    if verify:
        bad_sum = [n for n, meta in expected.items() if tensor_sha256(tensors[n]) != meta.get("sha256")]
        if bad_sum:
            raise spec.error(
                f"checksum mismatch in {wpath} for {len(bad_sum)} tensor(s): {bad_sum[:5]} (file corrupted or edited)"
            )


def read_checkpoint(spec: CheckpointSpec, directory: str | os.PathLike, *, verify: bool = True) -> Checkpoint:
    """Read and verify the checkpoint in ``directory``: manifest (:func:`read_manifest`), file size, tensor names,
    shapes and dtypes, and (``verify=True``) the SHA-256 of every tensor; errors name the offending tensors."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    d = Path(directory)
    manifest = read_manifest(spec, d)
    wpath = d / manifest["tensor_file"]
    if not wpath.is_file():
        raise spec.missing_error(f"{d} has no {wpath.name}: the checkpoint is incomplete")
    size, want = wpath.stat().st_size, manifest.get("tensor_file_bytes")
    if want is not None and size != want:
        raise spec.error(f"{wpath} has {size:,} bytes, the manifest says {want:,}: the file is truncated or corrupt")
    try:
        tensors = load_file(str(wpath))
    except (SafetensorError, OSError, ValueError) as e:
        raise spec.error(
            f"{wpath} cannot be read ({type(e).__name__}: {e}); the file is truncated or corrupt"
        ) from None
    _check_tensor_table(spec, wpath, manifest, tensors, verify)
    return Checkpoint(d, manifest, tensors)
