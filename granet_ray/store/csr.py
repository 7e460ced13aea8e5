"""Masks and CSR patterns: a >= 2-D weight is viewed as the matrix (out, in*kh*kw...).

The pattern comes from the mask, never from the values, so an active weight equal to 0.0 keeps
its place. Positions are row-major flat offsets into the matrix (int64).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch

from granet_ray.store.errors import InvalidInputError, SchemaMismatchError


def matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """(rows, cols) of the 2-D view of a >= 2-D tensor: (shape[0], prod(shape[1:]))."""
    return shape[0], math.prod(shape[1:])


def mask_positions(name: str, tensor: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
    """Flat int64 positions (nnz,) where the mask is True, ascending.

    Raises InvalidInputError when the mask is not a bool tensor of the weight's shape or the
    weight has fewer than 2 dims.
    """
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        kind = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise InvalidInputError(f"mask for {name!r} must be a torch.bool tensor, got {kind}")
    if tensor.dim() < 2:
        raise InvalidInputError(
            f"mask given for {name!r} of shape {tuple(tensor.shape)}: only >= 2-D weights "
            "(Conv / Linear) can be masked"
        )
    if mask.shape != tensor.shape:
        raise InvalidInputError(
            f"mask for {name!r} has shape {tuple(mask.shape)}, the tensor has {tuple(tensor.shape)}"
        )
    return np.flatnonzero(mask.detach().cpu().numpy())


def _count_nonzero(stored: np.ndarray, dtype: str) -> int:
    if dtype == "bfloat16":  # uint16 bits: ignore the sign so that -0.0 is zero
        return int(np.count_nonzero(stored & 0x7FFF))
    return int(np.count_nonzero(stored))


def active_values(what: str, flat: np.ndarray, dtype: str, positions: np.ndarray) -> np.ndarray:
    """The stored values (nnz,) of a flat stored array at ``positions``; InvalidInputError
    naming ``what`` if any other value is non-zero (-0.0 counts as zero, NaN does not)."""
    values = flat[positions]
    outside = _count_nonzero(flat, dtype) - _count_nonzero(values, dtype)
    if outside:
        raise InvalidInputError(
            f"{what} has {outside} non-zero value(s) outside its mask; masked weights must be "
            "exactly zero where the mask is False"
        )
    return values


def pattern_arrays(positions: np.ndarray, rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
    """CSR ``indptr`` (rows+1,) and ``indices`` (nnz,) as int64 from ascending flat positions."""
    indptr = np.searchsorted(positions, np.arange(rows + 1, dtype=np.int64) * cols)
    indices = positions - np.repeat(np.arange(rows, dtype=np.int64) * cols, np.diff(indptr))
    return indptr, indices


def positions_from_pattern(
    indptr: np.ndarray, indices: np.ndarray, rows: int, cols: int, where: str
) -> np.ndarray:
    """Flat int64 positions (nnz,) from a stored CSR pattern, after checking it is well formed:
    indptr starts at 0, never decreases, ends at nnz; indices lie in [0, cols) and strictly
    increase within each row. Raises SchemaMismatchError naming ``where`` otherwise."""
    indptr64 = indptr.astype(np.int64)
    nnz = len(indices)
    if len(indptr64) != rows + 1 or indptr64[0] != 0 or indptr64[-1] != nnz:
        raise SchemaMismatchError(
            f"{where}: indptr must have {rows + 1} entries from 0 to {nnz}, got "
            f"{len(indptr64)} entries ending at {indptr64[-1] if len(indptr64) else 'nothing'}"
        )
    counts = np.diff(indptr64)
    if (counts < 0).any():
        raise SchemaMismatchError(f"{where}: indptr decreases")
    positions = np.repeat(np.arange(rows, dtype=np.int64) * cols, counts)
    positions += indices.astype(np.int64, copy=False)
    if nnz and int(indices.max()) >= cols:
        raise SchemaMismatchError(f"{where}: column index {int(indices.max())} >= {cols}")
    if nnz > 1 and not (positions[1:] > positions[:-1]).all():
        raise SchemaMismatchError(f"{where}: column indices are not strictly increasing per row")
    return positions


def scatter(positions: np.ndarray, values: np.ndarray, numel: int) -> np.ndarray:
    """Flat array (numel,) with ``values`` at ``positions`` and zeros elsewhere (writable)."""
    out = np.zeros(numel, values.dtype)
    out[positions] = values
    return out


def mask_from_positions(positions: np.ndarray, shape: tuple[int, ...]) -> torch.Tensor:
    """Bool mask of ``shape``, True exactly at the flat ``positions``."""
    mask = np.zeros(math.prod(shape), np.bool_)
    mask[positions] = True
    return torch.from_numpy(mask).view(shape)


def sparse_csr(
    indptr: np.ndarray, indices: np.ndarray, values: torch.Tensor, rows: int, cols: int
) -> torch.Tensor:
    """A torch sparse CSR tensor (rows, cols) with int64 index arrays (already validated)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(
            torch.from_numpy(indptr.astype(np.int64)),
            torch.from_numpy(indices.astype(np.int64)),
            values,
            size=(rows, cols),
            check_invariants=False,
        )
