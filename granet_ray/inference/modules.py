"""Sparse inference modules: ``SparseConv2d`` and ``SparseLinear``, each with its dense twin.

Each holds the layer's (masked, BatchNorm-folded) weight twice: dense, for the dense path, and
as CSR over output channels for the sparse kernel. In ``kernel="auto"`` the first call for
each input shape times both paths on that input and keeps the faster (cached per shape), so a
layer is never slower than its dense self by more than the timing noise.

The sparse kernel runs only for CPU ``float32`` inputs in eval mode without autograd; anything
else (CUDA, other dtypes, training, inputs that require grad) takes the dense path.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from granet_ray.inference import kernels

KERNELS = ("auto", "sparse", "dense")
TIMING_REPEATS = 3  # timed calls per path when choosing (after one warm-up call each)

ShapeKey = tuple[tuple[int, ...], bool]


@dataclass
class Choice:
    """The path chosen for one input shape, with the timings that chose it.

    Attributes:
        kernel: ``"sparse"`` or ``"dense"``.
        dense_s: Best dense latency in seconds (None when not timed).
        sparse_s: Best sparse latency in seconds (None when not timed).
    """

    kernel: str
    dense_s: float | None = None
    sparse_s: float | None = None


def timed(fn: Callable[[], object]) -> float:
    """Seconds one call of ``fn`` takes.

    Args:
        fn: The call to time.

    Returns:
        Its wall-clock duration.
    """
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def best_time(fn: Callable[[], object], repeats: int) -> float:
    """Fastest of ``repeats`` timed calls of ``fn`` (after one untimed warm-up call).

    Args:
        fn: The call to time.
        repeats: Timed calls.

    Returns:
        The fastest call, in seconds.
    """
    fn()
    return min(timed(fn) for _ in range(repeats))


class _SparseLayer(nn.Module):
    """Shared state and path choice of the sparse layers."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, kernel: str) -> None:
        super().__init__()
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
        weight = weight.detach().float().contiguous()
        self.register_buffer("weight", weight)
        self.register_buffer("bias", None if bias is None else bias.detach().float().contiguous())
        rows = weight.reshape(weight.shape[0], -1)
        self.nnz = int(rows.count_nonzero())
        self.density = self.nnz / max(1, rows.numel())
        self.kernel = kernel
        self.timing_repeats = TIMING_REPEATS
        self.choices: dict[ShapeKey, Choice] = {}
        self.relu = False  # ReLU fused after the layer (and after the residual, if any)
        self.eval()

    def epilogue(self, y: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        """The fused tail in torch ops: ``y += residual``, then ReLU where fused, in place.

        Args:
            y: The layer's fresh output.
            residual: Added to it, or None.

        Returns:
            ``y`` (or a new tensor where ``residual`` broadcasts it to another shape).
        """
        if residual is not None:
            y = y.add_(residual) if residual.shape == y.shape else y + residual
        return y.relu_() if self.relu else y

    def _csr(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(rowptr, nonzero flat indices within a row's weight block, values), row-major."""
        rows = self.weight.reshape(self.weight.shape[0], -1)
        out_index, flat = rows.nonzero(as_tuple=True)
        counts = torch.bincount(out_index, minlength=rows.shape[0])
        rowptr = torch.zeros(rows.shape[0] + 1, dtype=torch.int64)
        rowptr[1:] = torch.cumsum(counts, 0)
        return rowptr, flat, rows[out_index, flat].contiguous()

    def _runs_sparse(self, x: torch.Tensor) -> bool:
        return (
            self.kernel != "dense"
            and not self.training
            and x.device.type == "cpu"
            and x.dtype == torch.float32
            and not (torch.is_grad_enabled() and x.requires_grad)
        )

    def dense(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """The dense path (defined by each layer)."""
        raise NotImplementedError

    def sparse(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """The sparse path (defined by each layer)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """The layer applied to ``x``, on the path chosen for its shape.

        Args:
            x: The input.
            residual: Added to the output before the ReLU (when fused), or None; ``convert``
                passes it where it fused a residual addition into the layer.

        Returns:
            The layer's output (plus ``residual``, then ReLU, where fused).
        """
        if not self._runs_sparse(x):
            return self.dense(x, residual)
        if self.kernel == "sparse":
            return self.sparse(x, residual)
        key = (x.shape, x.is_contiguous())
        choice = self.choices.get(key)
        if choice is None:
            choice = self.choose(
                partial(self.dense, x, residual),
                partial(self.sparse, x, residual),
                self.timing_repeats,
            )
            self.choices[key] = choice
        return self.sparse(x, residual) if choice.kernel == "sparse" else self.dense(x, residual)

    @staticmethod
    def choose(
        dense: Callable[[], torch.Tensor], sparse: Callable[[], torch.Tensor], repeats: int
    ) -> Choice:
        """Time both paths on the real input and keep the faster.

        After one warm-up call each, the paths run alternately ``repeats`` times, so a burst
        of load from elsewhere hits both; the fastest call of each counts.

        Args:
            dense: The dense call.
            sparse: The sparse call.
            repeats: Timed calls per path.

        Returns:
            The choice, with both timings.
        """
        with torch.no_grad():
            sparse()
            dense()
            sparse_s = dense_s = float("inf")
            for _ in range(repeats):
                sparse_s = min(sparse_s, timed(sparse))
                dense_s = min(dense_s, timed(dense))
        return Choice("sparse" if sparse_s < dense_s else "dense", dense_s, sparse_s)


@dataclass(frozen=True)
class _ConvPlan:
    """Input layout and nonzero offsets for one input shape."""

    out_h: int
    out_w: int
    plane: tuple[int, int]  # (rows, columns) of each phase plane; columns = the wide width
    phases: tuple[int, int]  # stride phases laid out: (sy, sx), or (1, 1) for 1x1 kernels
    step: tuple[int, int]  # input rows / columns between neighbours in a plane: the stride
    top: int
    left: int
    offset: torch.Tensor

    def direct(self, x: torch.Tensor) -> bool:
        """Whether ``x`` already is the layout (a contiguous unpadded 1x1 stride-1 input)."""
        return (
            self.phases == self.step == (1, 1)
            and self.top == self.left == 0
            and self.plane == tuple(x.shape[2:])
            and x.is_contiguous()
        )


class SparseConv2d(_SparseLayer):
    """A ``Conv2d`` for CPU inference whose sparse weight runs a direct sparse convolution.

    Every stride, padding (ints or ``"same"`` / ``"valid"``), dilation, groups (depthwise
    included) and kernel shape is exact; ``padding_mode`` must be ``"zeros"``.

    Args:
        conv: The convolution (masked, BatchNorm folded): geometry, weight and bias.
        kernel: ``"auto"`` (time both paths per input shape), ``"sparse"`` or ``"dense"``.

    Raises:
        ValueError: ``padding_mode`` other than zeros, or an unknown ``kernel``.
    """

    def __init__(self, conv: nn.Conv2d, kernel: str = "auto") -> None:
        if conv.padding_mode != "zeros":
            raise ValueError(f"padding_mode={conv.padding_mode!r} is not supported; use 'zeros'")
        super().__init__(conv.weight, conv.bias, kernel)
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride = tuple(conv.kernel_size), tuple(conv.stride)
        self.dilation, self.groups = tuple(conv.dilation), conv.groups
        self.padding = conv.padding
        self.rowptr, flat, self.values = self._csr()
        kh, kw = self.kernel_size
        cin_g = self.in_channels // self.groups
        rows = torch.arange(self.out_channels).repeat_interleave(torch.diff(self.rowptr))
        group = rows // (self.out_channels // self.groups)
        self.nz_channel = group * cin_g + flat // (kh * kw)
        self.nz_ky = (flat // kw) % kh
        self.nz_kx = flat % kw
        self.plans: dict[tuple[int, ...], _ConvPlan] = {}

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
            f"groups={self.groups}, density={self.density:.4f}, kernel={self.kernel!r}"
        )

    def _pads(self) -> tuple[int, int, int, int]:
        """(top, bottom, left, right) zero padding."""
        if isinstance(self.padding, str):
            if self.padding == "valid":
                return 0, 0, 0, 0
            total_h = self.dilation[0] * (self.kernel_size[0] - 1)
            total_w = self.dilation[1] * (self.kernel_size[1] - 1)
            return total_h // 2, total_h - total_h // 2, total_w // 2, total_w - total_w // 2
        ph, pw = self.padding
        return ph, ph, pw, pw

    def _plan(self, shape: tuple[int, ...]) -> _ConvPlan | None:
        plan = self.plans.get(shape)
        if plan is not None:
            return plan
        _, _, h, w = shape
        (kh, kw), (sy, sx), (dy, dx) = self.kernel_size, self.stride, self.dilation
        top, bottom, left, right = self._pads()
        out_h = (h + top + bottom - dy * (kh - 1) - 1) // sy + 1
        out_w = (w + left + right - dx * (kw - 1) - 1) // sx + 1
        if out_h <= 0 or out_w <= 0:
            return None  # the dense path raises torch's own error
        if kh == kw == 1:  # one phase used: lay out only that one
            plan_h, plan_w, phases = out_h, out_w, (1, 1)
            offset = self.nz_channel * (out_h * out_w)
        else:
            plan_h = out_h + (kh - 1) * dy // sy
            plan_w = out_w + (kw - 1) * dx // sx
            phases = (sy, sx)
            ry, rx = self.nz_ky * dy, self.nz_kx * dx
            phase = (self.nz_channel * sy + ry % sy) * sx + rx % sx
            offset = phase * (plan_h * plan_w) + (ry // sy) * plan_w + rx // sx
        plan = _ConvPlan(
            out_h, out_w, (plan_h, plan_w), phases, (sy, sx), top, left, offset.contiguous()
        )
        self.plans[shape] = plan
        return plan

    def _planes(self, x: torch.Tensor, plan: _ConvPlan) -> torch.Tensor:
        """The input as the kernel reads it: padded, split into stride phases, contiguous."""
        if plan.direct(x):
            return x
        out = torch.empty(x.shape[0], x.shape[1], *plan.phases, *plan.plane)
        kernels.layout(x, out, phases=plan.phases, step=plan.step, top=plan.top, left=plan.left)
        return out

    def dense(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """The dense path: ``F.conv2d`` with the held weight, then the fused tail in torch.

        Args:
            x: (N, C, H, W) input.
            residual: Added to the output before the ReLU (when fused), or None.

        Returns:
            The convolution's output.
        """
        y = F.conv2d(
            x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups
        )
        return self.epilogue(y, residual)

    def sparse(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """The sparse path (CPU, float32, no autograd), the fused tail in the kernel.

        Args:
            x: (N, C, H, W) input, any memory format.
            residual: Added to the output before the ReLU (when fused), or None.

        Returns:
            The convolution's output, in the memory format the dense path would give.
        """
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            return self.dense(x, residual)  # torch raises its own error for the bad shape
        plan = self._plan(tuple(x.shape))
        if plan is None:
            return self.dense(x, residual)
        channels_last = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
        planes = self._planes(x, plan)
        n = x.shape[0]
        y = torch.empty(n, self.out_channels, plan.out_h, plan.out_w)
        fused = residual is None or (
            residual.shape == y.shape and residual.dtype == y.dtype and residual.device == y.device
        )
        kernels.sparse_conv(
            planes,
            planes[0].numel() if n else 0,
            self.rowptr,
            plan.offset,
            self.values,
            self.bias,
            y,
            residual=residual.contiguous() if fused and residual is not None else None,
            relu=self.relu and fused,
            y_image=y[0].numel() if n else 0,
            y_row=plan.out_h * plan.out_w,
            length=(plan.out_h - 1) * plan.plane[1] + plan.out_w,
            wide=plan.plane[1],
            width=plan.out_w,
            images=n,
        )
        if not fused:
            y = self.epilogue(y, residual)
        if channels_last:
            return y.contiguous(memory_format=torch.channels_last)
        return y


class SparseLinear(_SparseLayer):
    """A ``Linear`` for CPU inference whose sparse weight runs a sparse x dense product.

    Args:
        linear: The layer to convert (masked): its weight and bias.
        kernel: ``"auto"`` (time both paths per input shape), ``"sparse"`` or ``"dense"``.

    Raises:
        ValueError: An unknown ``kernel``.
    """

    def __init__(self, linear: nn.Linear, kernel: str = "auto") -> None:
        super().__init__(linear.weight, linear.bias, kernel)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.rowptr, self.nz_column, self.values = self._csr()
        self.offsets: dict[int, torch.Tensor] = {}

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"density={self.density:.4f}, kernel={self.kernel!r}"
        )

    def dense(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """The dense path: ``F.linear`` with the held weight, then the fused tail in torch.

        Args:
            x: (..., in_features) input.
            residual: Added to the output before the ReLU (when fused), or None.

        Returns:
            (..., out_features) output.
        """
        return self.epilogue(F.linear(x, self.weight, self.bias), residual)

    def sparse(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """The sparse path (CPU, float32, no autograd); a fused ReLU runs in the kernel.

        Args:
            x: (..., in_features) input.
            residual: Added to the output before the ReLU (when fused), or None.

        Returns:
            (..., out_features) output.
        """
        if x.dim() == 0 or x.shape[-1] != self.in_features or residual is not None:
            return self.dense(x, residual)  # torch raises its own error for a bad shape
        rows = x.reshape(-1, self.in_features)
        n = rows.shape[0]
        offset = self.offsets.get(n)
        if offset is None:
            offset = self.offsets[n] = (self.nz_column * n).contiguous()
        columns = rows.t().contiguous() if n > 1 else rows  # (in_features, N): N per feature
        y = torch.empty(self.out_features, n)
        kernels.sparse_conv(
            columns,
            0,
            self.rowptr,
            offset,
            self.values,
            self.bias,
            y,
            relu=self.relu,
            y_image=0,
            y_row=n,
            length=n,
            wide=n,
            width=n,
            images=1 if n else 0,
        )
        out = y.t().contiguous() if n > 1 else y.view(1, self.out_features)
        return out.view(*x.shape[:-1], self.out_features)
