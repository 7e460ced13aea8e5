"""Export a sparse checkpoint as one dense ``safetensors`` file, for tools that want dense
weights (no pickle on either side)."""

from __future__ import annotations

import os
from typing import Any

from safetensors.torch import save as safetensors_bytes

from granet_ray.store.api import load_sparse
from granet_ray.store.errors import CheckpointExistsError, InvalidURIError
from granet_ray.store.storage import Location, open_storage, parse_uri


def export_safetensors(
    uri: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    storage_options: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> str:
    """Write the checkpoint's model state dict, dense, to ``out`` (a local path or s3:// URI,
    committed atomically); returns the canonical URI of ``out``. The safetensors metadata
    records the source URI. Raises InvalidURIError if ``out`` is a local folder,
    CheckpointExistsError if ``out`` exists and not ``overwrite``."""
    target = parse_uri(out)
    parent_path, _, name = target.path.rpartition("/")
    if not name or not parent_path:
        raise InvalidURIError(f"invalid output {os.fspath(out)!r}: expected a file path")
    if target.scheme == "file" and os.path.isdir(target.path):
        raise InvalidURIError(
            f"invalid output {target.uri}: it is a folder; give the file to write, e.g. "
            f"{target.uri}/{parse_uri(uri).path.rpartition('/')[2]}.safetensors"
        )
    options = storage_options if target.scheme == "s3" else None
    parent = open_storage(Location(target.scheme, parent_path).uri, options)
    if not overwrite and parent.get(name, 1) is not None:
        raise CheckpointExistsError(
            f"{target.uri} exists; pass overwrite=True (CLI: --overwrite) to replace it"
        )
    checkpoint = load_sparse(uri, storage_options=storage_options)
    data = safetensors_bytes(checkpoint.state_dict, metadata={"source": checkpoint.uri})
    parent.put(name, data)
    return target.uri
