"""Build and load the sparse kernels: ``csrc/sparse_conv.cpp``, compiled on this machine.

The source is compiled once per machine with the system C++ compiler (``$CXX``, else ``c++``,
``g++``, ``clang++``) into a cache folder (``$GRANET_RAY_CACHE``, else
``~/.cache/granet_ray``), named by a hash of the source, compiler and flags, so a new
version or a new CPU builds afresh and a rebuild is never needed otherwise. The first try
targets this CPU (``-march=native``: AVX-512 or AVX2 code where present); if that fails, a
portable build follows; ``$GRANET_RAY_KERNEL_FLAGS`` replaces both with its own target flags
(e.g. ``"-mavx2 -mfma"``, or ``""`` for the portable path). It is a plain shared library
loaded with ``ctypes`` (no Python or torch headers, so the build is quick) that
links the OpenMP runtime torch itself loaded, so both share one thread pool.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

SOURCE = Path(__file__).parent / "csrc" / "sparse_conv.cpp"
_FLAGS = ("-O3", "-fPIC", "-shared", "-fopenmp", "-std=c++17")
_TARGETS = (("-march=native",), ())  # this CPU first, then the compiler's portable default

_lock = threading.Lock()
_library: ctypes.CDLL | None = None


class KernelBuildError(RuntimeError):
    """The sparse kernels could not be compiled or loaded on this machine."""


def cache_dir() -> Path:
    """Folder of the compiled kernels: ``$GRANET_RAY_CACHE`` or ``~/.cache/granet_ray``.

    Returns:
        The folder (created if missing) holding ``kernels-<hash>.so`` files.
    """
    root = os.environ.get("GRANET_RAY_CACHE") or Path.home() / ".cache" / "granet_ray"
    folder = Path(root) / "kernels"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _compiler() -> str:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return name
    raise KernelBuildError("no C++ compiler found (set $CXX or install g++)")


def _build(compiler: str, target: tuple[str, ...]) -> Path:
    source = SOURCE.read_bytes()
    flags = (*_FLAGS, *target)
    key = hashlib.sha256(source + " ".join((compiler, *flags)).encode()).hexdigest()[:16]
    output = cache_dir() / f"kernels-{key}.so"
    if output.exists():
        return output
    with tempfile.TemporaryDirectory(dir=output.parent) as tmp:
        partial = Path(tmp) / output.name
        result = subprocess.run(
            [compiler, *flags, str(SOURCE), "-o", str(partial)],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise KernelBuildError(f"{compiler} {' '.join(flags)} failed:\n{result.stderr}")
        os.replace(partial, output)  # atomic: concurrent builders each land a whole file
    return output


def _targets() -> tuple[tuple[str, ...], ...]:
    flags = os.environ.get("GRANET_RAY_KERNEL_FLAGS")
    return _TARGETS if flags is None else (tuple(flags.split()),)


def _load() -> ctypes.CDLL:
    compiler = _compiler()
    errors = []
    for target in _targets():
        try:
            library = ctypes.CDLL(str(_build(compiler, target)))
        except (KernelBuildError, OSError) as exc:
            errors.append(str(exc))
            continue
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        library.granet_sparse_conv.argtypes = [
            ptr,
            i64,
            ptr,
            ptr,
            ptr,
            ptr,
            ptr,
            ctypes.c_int,
            ptr,
            i64,
            i64,
            i64,
            i64,
            i64,
            i64,
            i64,
            ctypes.c_int,
        ]
        library.granet_sparse_conv.restype = None
        library.granet_layout.argtypes = [ptr, *[i64] * 16, ptr, ctypes.c_int]
        library.granet_layout.restype = None
        library.granet_isa.restype = ctypes.c_char_p
        return library
    raise KernelBuildError("could not build the sparse kernels:\n" + "\n".join(errors))


def library() -> ctypes.CDLL:
    """The loaded kernel library, built on first use (thread-safe).

    Returns:
        The ``ctypes`` library exposing ``granet_sparse_conv`` and ``granet_isa``.

    Raises:
        KernelBuildError: No compiler, or neither the native nor the portable build worked.
    """
    global _library
    with _lock:
        if _library is None:
            _library = _load()
        return _library


def isa() -> str:
    """The vector path of the loaded build: ``"avx512"``, ``"avx2"`` or ``"portable"``.

    Returns:
        The name the compiled library reports.
    """
    return library().granet_isa().decode()


def available() -> bool:
    """Whether the kernels build and load here.

    Returns:
        True when ``library()`` succeeds.
    """
    try:
        library()
    except KernelBuildError:
        return False
    return True


def sparse_conv(
    x: torch.Tensor,
    x_image: int,
    rowptr: torch.Tensor,
    offset: torch.Tensor,
    value: torch.Tensor,
    bias: torch.Tensor | None,
    y: torch.Tensor,
    *,
    residual: torch.Tensor | None = None,
    relu: bool = False,
    y_image: int,
    y_row: int,
    length: int,
    wide: int,
    width: int,
    images: int,
) -> None:
    """Run the kernel: ``y[n, row]`` = bias + sum of ``value[k] * x[n][offset[k]:][:length]``,
    plus ``residual``, then ReLU where asked.

    Every tensor must be contiguous, on the CPU, ``float32`` (``rowptr`` and ``offset``:
    ``int64``) and large enough for the reads and writes the geometry implies; the callers in
    this package lay them out. Runs on ``torch.get_num_threads()`` threads.

    Args:
        x: Input planes of all images (element ``n * x_image`` starts image ``n``).
        x_image: Elements between images in ``x``.
        rowptr: CSR row pointer over output channels, ``m + 1`` entries.
        offset: Element offset in an image's planes of each nonzero's input run.
        value: The nonzero weights.
        bias: Per output channel, or None.
        y: Output, written in place.
        residual: Added to the output before the ReLU; laid out as ``y``; or None.
        relu: Apply ``max(0, .)`` last.
        y_image: Elements between images in ``y``.
        y_row: Elements between output channels in ``y``.
        length: Wide positions per output channel (``(Ho - 1) * wide + width``).
        wide: Wide row width (input plane row width).
        width: Output row width stored (columns ``>= width`` of each wide row are dropped).
        images: Number of images.
    """
    library().granet_sparse_conv(
        x.data_ptr(),
        x_image,
        rowptr.data_ptr(),
        offset.data_ptr(),
        value.data_ptr(),
        None if bias is None else bias.data_ptr(),
        None if residual is None else residual.data_ptr(),
        int(relu),
        y.data_ptr(),
        y_image,
        y_row,
        rowptr.numel() - 1,
        length,
        wide,
        width,
        images,
        torch.get_num_threads(),
    )


def layout(
    x: torch.Tensor,
    out: torch.Tensor,
    *,
    phases: tuple[int, int],
    step: tuple[int, int],
    top: int,
    left: int,
) -> None:
    """Lay out ``x`` for the kernel in one pass: zero-padded and split into stride phases.

    ``out[n, c, py, px, a, b] = x[n, c, py + step_y * a - top, px + step_x * b - left]`` for
    ``py < phases_y, px < phases_x``, zero outside ``x``. ``x`` is read through its strides,
    so any memory format works.

    Args:
        x: (N, C, H, W) float32 CPU input.
        out: Contiguous float32 (N, C, phases_y, phases_x, plane_h, plane_w) output.
        phases: The phases laid out, ``(phases_y, phases_x)``.
        step: Input rows and columns between neighbours in a phase plane.
        top: Zero rows above the input.
        left: Zero columns left of the input.
    """
    n, c, h, w = x.shape
    library().granet_layout(
        x.data_ptr(),
        *x.stride(),
        n,
        c,
        h,
        w,
        *phases,
        *step,
        *out.shape[-2:],
        top,
        left,
        out.data_ptr(),
        torch.get_num_threads(),
    )
