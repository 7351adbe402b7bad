"""An export bundle on disk: layout, manifest, checksums, and loading without pickle.

Layout (format 1)::

    <bundle>/manifest.json   what the bundle holds (below) and every file's size + sha256
    <bundle>/user.pt2        split models: the user part (torch.export program)
    <bundle>/candidate.pt2   split models: the candidate part
    <bundle>/model.pt2       single-program models instead of the two above
    <bundle>/rows/           the read-only row store (RocksDB; ``serve/rowstore.py``)

``manifest.json``: ``format``, ``kind`` (``"terarec-bundle"``), ``step`` / ``samples``
(of the training run when the checkpoint was taken), ``checkpoint`` (its path, kind,
manifest sha256), ``model`` (kind, ``mode`` split | single, ``programs``, what is
shared per request), ``features`` (model order, user-side and candidate-side features,
each feature's table, dense feature names and side), ``tables`` (id, dim, pooling, row
dtype and bytes, row count), ``row_dtype``, ``files`` and the training ``config``.

Loading executes no code from the bundle: the manifest is JSON, the rows are raw
bytes, and a ``.pt2`` archive is accepted only when none of its weights or constants
is pickled and its sample inputs load with ``torch.load(weights_only=True)``
(``torch.export.load`` would otherwise fall back to unpickling them).
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch.export.passes import move_to_device_pass

from terarec.trainer.checkpoint.files import sha256

FORMAT = 1
KIND = "terarec-bundle"
MANIFEST = "manifest.json"
ROWS = "rows"
_UNLISTED = ("LOG", "LOCK")  # RocksDB's info log and lock: change when a store is opened


class BundleError(RuntimeError):
    """A bundle that cannot be loaded (names the file and what is wrong)."""


def listed_files(root: Path) -> list[str]:
    """The files of a bundle its manifest describes (relative paths, sorted)."""
    out = []
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and rel != MANIFEST and not p.name.startswith(_UNLISTED):
            out.append(rel)
    return out


def describe(root: Path) -> dict[str, dict[str, Any]]:
    return {rel: {"size": (root / rel).stat().st_size, "sha256": sha256(root / rel)}
            for rel in listed_files(root)}


def read_manifest(root: Path, verify: str = "programs") -> dict[str, Any]:
    """The manifest of bundle ``root``, its files checked.

    Args:
        verify: ``"sizes"`` (every file's size), ``"programs"`` (sizes, and the sha256
            of everything but the row store) or ``"full"`` (every file's sha256: reads
            the whole row store).
    Raises:
        BundleError: not a bundle of this format, or a file missing, resized or changed.
    """
    root = Path(root)
    path = root / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise BundleError(f"{path}: not a readable bundle manifest ({e})") from None
    if manifest.get("kind") != KIND or manifest.get("format") != FORMAT:
        raise BundleError(f"{path}: not a terarec bundle of format {FORMAT} (kind "
                          f"{manifest.get('kind')!r}, format {manifest.get('format')!r})")
    for rel, meta in manifest["files"].items():
        f = root / rel
        if not f.is_file():
            raise BundleError(f"{f}: missing (the manifest lists it)")
        if f.stat().st_size != meta["size"]:
            raise BundleError(f"{f}: {f.stat().st_size} bytes, the manifest says "
                              f"{meta['size']}")
        check = verify == "full" or (verify == "programs" and not rel.startswith(ROWS + "/"))
        if check and sha256(f) != meta["sha256"]:
            raise BundleError(f"{f}: sha256 differs from the manifest (changed or corrupted)")
    return manifest


def write_manifest(root: Path, manifest: dict[str, Any]) -> None:
    tmp = root / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    tmp.replace(root / MANIFEST)


def check_pickle_free(path: Path) -> None:
    """Raises :class:`BundleError` unless the ``.pt2`` archive loads without
    unpickling anything (see the module docstring)."""
    try:
        with zipfile.ZipFile(path) as z:
            for name in z.namelist():
                if name.endswith(("model_weights_config.json", "model_constants_config.json")):
                    config = json.loads(z.read(name)).get("config", {})
                    for fqn, meta in config.items():
                        pickled = meta.get("use_pickle", False)
                        if pickled or not meta.get("path_name", "").startswith(
                                ("weight_", "tensor_")):
                            raise BundleError(f"{path}: {fqn} is stored pickled; refusing "
                                              "to load it")
                elif "/sample_inputs/" in name:
                    torch.load(io.BytesIO(z.read(name)), weights_only=True)
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise BundleError(f"{path}: not a readable program archive ({e})") from None
    except Exception as e:  # noqa: BLE001 - the weights_only unpickler refused it
        if isinstance(e, BundleError):
            raise
        raise BundleError(f"{path}: sample inputs are not plain tensors ({e})") from None


def load_program(path: Path, check_inputs: bool = False,
                 device: torch.device | str = "cpu") -> torch.nn.Module:
    """A ``.pt2`` program of a bundle as a callable module (checked pickle-free) on
    ``device``.

    Args:
        device: where the weights go and the program runs. The graph of an exported
            program names the device it was exported on (e.g. the check of a dtype
            conversion asserts a CPU input), so it is moved with ``torch.export``'s own
            ``move_to_device_pass``, not with ``Module.to``.
        check_inputs: keep ``torch.export``'s per-call check of the inputs against the
            program's shape constraints. The scorer builds every input itself (shapes
            from the manifest), so it drops the check (about 0.1 ms a call on a CPU).
    """
    check_pickle_free(path)
    module = move_to_device_pass(torch.export.load(str(path)), device).module()
    if not check_inputs:
        hooks = module._forward_pre_hooks
        for key in [k for k, h in hooks.items()
                    if getattr(h, "__name__", "") == "_check_input_constraints_pre_hook"]:
            del hooks[key]
        graph = getattr(module, "graph", None)  # newer torch: a guard call in the graph
        guards = [n for n in graph.nodes if n.op == "call_module"
                  and n.target == "_guards_fn" and not n.users] if graph is not None else []
        for node in guards:
            graph.erase_node(node)
        if guards:
            module.recompile()
    return module
