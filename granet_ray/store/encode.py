"""Saving side: validate a state dict, masks and optimizer state, and encode them in memory.

Tensors are grouped into Arrow files by role (model / optimizer), layout and stored types:
``model-csr-<dtype>-<indices type>``, ``model-dense-<dtype>``, ``optimizer-csrvalues-<dtype>``
(values in the pattern of their weight), ``optimizer-dense-<dtype>``, each suffixed with the
save id. Nothing here touches storage.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from granet_ray.store.codec import (
    Row,
    active_values,
    dtype_name,
    encode_file,
    mask_positions,
    matrix_shape,
    pattern_arrays,
    tensor_to_array,
)
from granet_ray.store.errors import InvalidInputError
from granet_ray.store.format import (
    CSR,
    DENSE,
    MASKED_DTYPES,
    STORED_TYPE,
    csr_schema,
    index_type,
    values_schema,
)
from granet_ray.store.manifest import MAX_NAME_CHARS, OptimizerState, TensorEntry, json_value

MAX_LIST_VALUES = 2**31 - 1  # Arrow list offsets are int32
Slot = tuple[tuple[str, ...], int]  # (file group, batch index)


@dataclass
class _Pending:
    label: str  # the record batch's name
    dtype: str
    tensor_shape: tuple[int, ...]
    columns: tuple[np.ndarray, ...]  # CSR: indptr, indices, values; else values
    pattern: str | None = None


@dataclass(frozen=True)
class Encoded:
    """A checkpoint ready to write: data files by name, and the manifest's tensor entries."""

    files: dict[str, bytes]
    tensors: dict[str, TensorEntry]
    param_groups: list[dict[str, Any]] | None
    optimizer_state: OptimizerState | None


def check_name(name: Any, what: str) -> str:
    """A tensor or key name: a printable string of 1-1024 characters."""
    if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME_CHARS or not name.isprintable():
        raise InvalidInputError(f"{what} name {name!r} must be a printable string of 1-1024 chars")
    return name


def cpu_tensor(value: Any, where: str) -> torch.Tensor:
    """A contiguous CPU copy-or-view of a dense tensor with an allowed dtype."""
    if not isinstance(value, torch.Tensor):
        raise InvalidInputError(f"{where} is a {type(value).__name__}, expected a torch.Tensor")
    if value.layout != torch.strided:
        raise InvalidInputError(f"{where} has layout {value.layout}; pass dense (strided) tensors")
    if dtype_name(value) is None:
        raise InvalidInputError(
            f"{where} has dtype {value.dtype}, not one of {sorted(STORED_TYPE)}"
        )
    return value.detach().cpu().contiguous()


def state_tensors(state: nn.Module | Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The CPU tensors of a model's state dict, or of a state dict, checked."""
    if isinstance(state, nn.Module):
        state = state.state_dict()
    if not isinstance(state, Mapping):
        raise InvalidInputError(
            f"state must be an nn.Module or a state dict, got {type(state).__name__}"
        )
    return {check_name(n, "tensor"): cpu_tensor(t, f"state[{n!r}]") for n, t in state.items()}


class Encoder:
    """Collects tensors into file groups, then encodes every group as one Arrow IPC file."""

    def __init__(self, save_id: str) -> None:
        self.save_id = save_id
        self.groups: dict[tuple[str, ...], list[_Pending]] = {}

    def _add(self, group: tuple[str, ...], pending: _Pending) -> Slot:
        items = self.groups.setdefault(group, [])
        items.append(pending)
        return group, len(items) - 1

    def dense(self, role: str, label: str, tensor: torch.Tensor) -> Slot:
        """Queue a tensor stored dense (flat, C order)."""
        dtype = dtype_name(tensor) or ""
        pending = _Pending(label, dtype, tuple(tensor.shape), (tensor_to_array(tensor),))
        return self._add((role, "dense", dtype), pending)

    def csr(
        self,
        role: str,
        label: str,
        tensor: torch.Tensor,
        positions: np.ndarray,
        *,
        what: str,
        pattern: str | None = None,
    ) -> Slot:
        """Queue the values at ``positions`` (checked: zero elsewhere), with their own CSR
        pattern, or only the values when ``pattern`` names the weight that holds it."""
        dtype = dtype_name(tensor) or ""
        values = active_values(what, tensor_to_array(tensor), dtype, positions)
        if len(values) > MAX_LIST_VALUES:
            raise InvalidInputError(f"{what} has {len(values)} active values, over 2**31 - 1")
        shape = tuple(tensor.shape)
        if pattern is not None:
            pending = _Pending(label, dtype, shape, (values,), pattern)
            return self._add((role, "csrvalues", dtype), pending)
        rows, cols = matrix_shape(shape)
        indptr, indices = pattern_arrays(positions, rows, cols)
        idx_type = index_type(max(cols - 1, 0))
        pending = _Pending(label, dtype, shape, (indptr, indices.astype(idx_type), values))
        return self._add((role, "csr", dtype, idx_type), pending)

    def encode(self) -> tuple[dict[str, bytes], dict[Slot, TensorEntry]]:
        """Data files by name and the manifest entry of every queued slot."""
        files: dict[str, bytes] = {}
        entries: dict[Slot, TensorEntry] = {}
        for group, items in self.groups.items():
            file = f"{'-'.join(group)}.{self.save_id}.arrow"
            values_type = STORED_TYPE[items[0].dtype]
            data_types = {}
            if group[1] == "csr":
                # indptr: the smallest type holding the group's largest nnz
                ptr_type = index_type(max(len(p.columns[1]) for p in items))
                for p in items:
                    p.columns = (p.columns[0].astype(ptr_type), *p.columns[1:])
                schema = csr_schema(ptr_type, group[3], values_type)
                data_types = {"pointers_to_1": ptr_type, "indices_1": group[3]}
            else:
                schema = values_schema(values_type)
            rows = [Row(p.label, p.columns) for p in items]
            if group[1] == "dense":  # small tensors share one record batch
                data, (size,) = encode_file(schema, [rows])
                raw = [sum(c.nbytes for c in p.columns) for p in items]
                places = [(0, i, size * r // max(sum(raw), 1)) for i, r in enumerate(raw)]
            else:  # large ones get a record batch each: their compressed size is exact
                data, sizes = encode_file(schema, [[row] for row in rows])
                places = [(i, 0, size) for i, size in enumerate(sizes)]
            files[file] = data
            is_csr = group[1] != "dense"
            for i, p in enumerate(items):
                batch, row, share = places[i]
                entries[group, i] = TensorEntry(
                    format=CSR if is_csr else DENSE,
                    shape=matrix_shape(p.tensor_shape) if is_csr else p.tensor_shape,
                    tensor_shape=p.tensor_shape,
                    dtype=p.dtype,
                    data_types={**data_types, "values": values_type},
                    number_of_stored_values=len(p.columns[-1]),
                    file=file,
                    batch=batch,
                    row=row,
                    bytes=share,
                    pattern=p.pattern,
                )
        return files, entries


def _optimizer_slots(
    encoder: Encoder,
    optimizer_state: Any,
    tensors: dict[str, torch.Tensor],
    positions: dict[str, np.ndarray],
) -> tuple[list[dict[str, Any]], dict[str, dict[str, tuple[str, Any]]]]:
    if not isinstance(optimizer_state, Mapping) or set(optimizer_state) != {
        "state",
        "param_groups",
    }:
        raise InvalidInputError("optimizer_state must be a dict with keys 'state', 'param_groups'")
    groups = json_value(optimizer_state["param_groups"], "optimizer_state['param_groups']")
    if not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
        raise InvalidInputError("optimizer_state['param_groups'] must be a list of dicts")
    state = optimizer_state["state"]
    if not isinstance(state, Mapping):
        raise InvalidInputError("optimizer_state['state'] must be a dict by parameter name")
    slots: dict[str, dict[str, tuple[str, Any]]] = {}
    for param, items in state.items():
        check_name(param, "optimizer state parameter")
        if not isinstance(items, Mapping):
            raise InvalidInputError(f"optimizer_state['state'][{param!r}] must be a dict")
        slots[param] = {}
        for key, value in items.items():
            check_name(key, "optimizer state key")
            where = f"optimizer_state['state'][{param!r}][{key!r}]"
            if not isinstance(value, torch.Tensor):
                slots[param][key] = ("value", json_value(value, where))
                continue
            tensor = cpu_tensor(value, where)
            label = f"optimizer/{param}/{key}"
            if (
                param in positions
                and tensor.shape == tensors[param].shape
                and dtype_name(tensor) in MASKED_DTYPES
            ):
                slot = encoder.csr(
                    "optimizer", label, tensor, positions[param], what=where, pattern=param
                )
            else:
                slot = encoder.dense("optimizer", label, tensor)
            slots[param][key] = ("tensor", slot)
    return groups, slots


def encode_checkpoint(
    tensors: dict[str, torch.Tensor],
    masks: Mapping[str, torch.Tensor],
    optimizer_state: Mapping[str, Any] | None,
    save_id: str,
) -> Encoded:
    """Encode model tensors (CSR where masked) and optional by-name optimizer state.

    Raises InvalidInputError for masks that are not bool / of the weight's shape / on 1-D or
    non-float tensors, for non-zero values outside a mask, and for non-JSON state values.
    """
    if not isinstance(masks, Mapping):
        raise InvalidInputError(f"masks must be a dict of bool tensors, got {type(masks).__name__}")
    for name in masks:
        if name not in tensors:
            raise InvalidInputError(f"mask given for {name!r}, which is not in the state dict")
    encoder = Encoder(save_id)
    slots: dict[str, Slot] = {}
    positions: dict[str, np.ndarray] = {}
    for name, tensor in tensors.items():
        if name not in masks:
            slots[name] = encoder.dense("model", name, tensor)
            continue
        if dtype_name(tensor) not in MASKED_DTYPES:
            raise InvalidInputError(
                f"mask given for {name!r} of dtype {tensor.dtype}; only float weights are masked"
            )
        positions[name] = mask_positions(name, tensor, masks[name])
        slots[name] = encoder.csr("model", name, tensor, positions[name], what=repr(name))
    groups, opt_slots = None, None
    if optimizer_state is not None:
        groups, opt_slots = _optimizer_slots(encoder, optimizer_state, tensors, positions)
    files, entries = encoder.encode()
    opt_state = None
    if opt_slots is not None:
        opt_state = {
            param: {
                key: entries[payload] if kind == "tensor" else payload
                for key, (kind, payload) in items.items()
            }
            for param, items in opt_slots.items()
        }
    return Encoded(
        files=files,
        tensors={name: entries[slot] for name, slot in slots.items()},
        param_groups=groups,
        optimizer_state=opt_state,
    )
