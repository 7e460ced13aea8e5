"""``convert``: a model for CPU inference whose sparse layers run sparse kernels."""

from __future__ import annotations

import copy
import operator
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.modules.conv import _ConvNd
from torch.nn.utils.fusion import fuse_conv_bn_eval

from granet_ray.inference.modules import KERNELS, Choice, SparseConv2d, SparseLinear
from granet_ray.sparsity.layers import unwrap, weight_layers

MAX_DENSITY = 0.5  # denser layers stay dense: the kernel cannot beat a dense GEMM there
DENSE_REASONS = "granet_dense_layers"  # attribute of a converted model: {layer: why dense}


def apply_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
    """Zero the weights outside their masks, in place.

    Args:
        model: The model (already unwrapped).
        masks: Weight name (``"<module>.weight"``) to bool mask of the weight's shape.

    Raises:
        ValueError: A mask names no Conv / Linear weight of the model, or has another shape.
    """
    layers = weight_layers(model)
    for name, mask in masks.items():
        if name not in layers:
            raise ValueError(f"mask {name!r} names no Conv / Linear weight of the model")
        weight = layers[name].weight
        if tuple(mask.shape) != tuple(weight.shape):
            raise ValueError(
                f"mask {name!r} has shape {list(mask.shape)}, the weight {list(weight.shape)}"
            )
        with torch.no_grad():
            weight.mul_(mask.to(device=weight.device, dtype=torch.bool))


def _trace(model: nn.Module, skipped: str) -> fx.GraphModule | None:
    """``model`` traced by ``torch.fx``, or None (with a warning naming what is ``skipped``)."""
    try:
        return fx.symbolic_trace(model)
    except Exception as exc:  # noqa: BLE001 - any tracing failure means: leave the graph alone
        warnings.warn(f"{skipped}: the model cannot be traced ({exc})", stacklevel=3)
        return None


def _call_counts(graph: fx.Graph) -> dict[str, int]:
    """How many times the graph calls each submodule."""
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    return calls


def _fold(traced: fx.GraphModule) -> None:
    """Fold BatchNorm2d into the Conv2d before it in ``traced``, where exact (in place)."""
    modules = dict(traced.named_modules())
    calls = _call_counts(traced.graph)
    for node in list(traced.graph.nodes):
        if node.op != "call_module" or not isinstance(modules[node.target], nn.BatchNorm2d):
            continue
        source = node.args[0]
        bn = modules[node.target]
        if (
            not isinstance(source, fx.Node)
            or source.op != "call_module"
            or not isinstance(modules[source.target], nn.Conv2d)
            or len(source.users) != 1
            or calls[source.target] != 1
            or calls[node.target] != 1
            or not bn.track_running_stats
            or bn.running_mean is None
        ):
            continue
        fused = fuse_conv_bn_eval(modules[source.target], bn)
        _replace(traced, source.target, fused)
        node.replace_all_uses_with(source)
        traced.graph.erase_node(node)
    traced.delete_all_unused_submodules()
    traced.recompile()


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Fold each eval-mode BatchNorm2d into the Conv2d right before it, where that is exact.

    A pair folds when the traced graph calls the BatchNorm (with running statistics) on the
    output of a Conv2d called only there and used by nothing else. Folding scales each output
    channel's weights, so zeros stay zeros. A model that ``torch.fx`` cannot trace comes back
    unfolded, with a warning.

    Args:
        model: An eval-mode model (not changed).

    Returns:
        A ``torch.fx.GraphModule`` with the pairs folded (same submodule names), or ``model``.
    """
    traced = _trace(model, "BatchNorm not folded")
    if traced is None:
        return model
    _fold(traced)
    return traced


_ADDS = (operator.add, operator.iadd, torch.add)
_RELUS = (F.relu, torch.relu, torch.relu_)


def _only_user(node: fx.Node) -> fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _adds(node: fx.Node, source: fx.Node) -> fx.Node | None:
    """The other operand when ``node`` is ``source + other`` (or ``source += other``)."""
    if node.op != "call_function" or node.target not in _ADDS or node.kwargs:
        return None
    if len(node.args) != 2 or node.args[0] is node.args[1]:
        return None
    first, second = node.args
    if first is source and isinstance(second, fx.Node):
        return second
    if second is source and isinstance(first, fx.Node) and node.target is not operator.iadd:
        return first  # `other += source` would change other in place: not fused
    return None


def _is_relu(node: fx.Node, source: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if not node.args or node.args[0] is not source or len(node.args) != 1:
        return False
    if node.op == "call_module":
        return isinstance(modules.get(node.target), nn.ReLU)
    if node.op == "call_function":
        return node.target in _RELUS and set(node.kwargs) <= {"inplace"}
    return node.op == "call_method" and node.target in ("relu", "relu_") and not node.kwargs


def fuse_epilogues(traced: fx.GraphModule) -> None:
    """Fuse into each sparse layer the residual addition and the ReLU that follow it.

    ``relu(conv(x) + other)`` becomes ``conv(x, other)`` with ``conv.relu`` set, where the
    layer is called once and its output (and the sum's) has no other use; in-place forms too,
    except ``other += conv(x)``, which changes ``other``. Changes ``traced`` in place.

    Args:
        traced: A traced model whose sparse layers are ``SparseConv2d`` / ``SparseLinear``.
    """
    modules = dict(traced.named_modules())
    calls = _call_counts(traced.graph)
    graph = traced.graph
    for node in list(graph.nodes):
        layer = modules.get(node.target) if node.op == "call_module" else None
        if not isinstance(layer, (SparseConv2d, SparseLinear)) or calls[node.target] != 1:
            continue
        if len(node.args) != 1 or node.kwargs:
            continue
        current, user = node, _only_user(node)
        other = _adds(user, node) if user is not None else None
        if isinstance(layer, SparseConv2d) and other is not None:
            with graph.inserting_before(user):  # `other` may come later than the layer call
                current = graph.call_module(node.target, (node.args[0], other))
            user.replace_all_uses_with(current)
            graph.erase_node(user)
            graph.erase_node(node)
            user = _only_user(current)
        if user is not None and _is_relu(user, current, modules):
            user.replace_all_uses_with(current)
            graph.erase_node(user)
            layer.relu = True
    graph.lint()
    traced.recompile()


def _dense_reason(module: nn.Module, max_density: float) -> str | None:
    """Why a Conv / Linear layer stays dense, or None when it converts."""
    if isinstance(module, _ConvNd) and not isinstance(module, nn.Conv2d):
        return f"{type(module).__name__}: only Conv2d has a sparse kernel"
    if isinstance(module, nn.Conv2d) and module.padding_mode != "zeros":
        return f"padding_mode={module.padding_mode!r}: only zero padding has a sparse kernel"
    density = float(module.weight.count_nonzero()) / max(1, module.weight.numel())
    if density > max_density:
        return f"density {density:.3f} > {max_density}"
    return None


def convert(
    model: nn.Module,
    masks: Mapping[str, torch.Tensor] | None = None,
    *,
    kernel: str = "auto",
    max_density: float = MAX_DENSITY,
    fold_bn: bool = True,
    fuse: bool = True,
) -> nn.Module:
    """A copy of ``model`` for CPU inference (eval mode) whose sparse layers run sparse kernels.

    Every ``Conv2d`` (any stride, padding, dilation, groups, kernel shape; zero padding) and
    ``Linear`` with weight density at most ``max_density`` becomes a ``SparseConv2d`` /
    ``SparseLinear``; the rest stay dense, their reasons kept in the returned model's
    ``granet_dense_layers`` dict. With ``kernel="auto"`` each sparse layer times its dense and
    sparse paths on the first call for each input shape and keeps the faster (see
    ``layer_report``). BatchNorm is folded into the preceding convolution where exact (see
    ``fold_batchnorm``), and a residual addition and ReLU after a sparse layer run inside its
    kernel (see ``fuse_epilogues``); both need a model ``torch.fx`` can trace (the result is
    then a ``GraphModule`` with the same submodule names), else a warning says they were
    skipped. The model passed in is not changed.

    Args:
        model: The model (DataParallel / DDP / ``torch.compile`` wrappers are unwrapped).
        masks: Weight name to bool mask (as ``load_sparse(...).masks``); None takes the zeros
            of the weights as the pattern.
        kernel: ``"auto"``, ``"sparse"`` (always the sparse kernel on CPU float32) or
            ``"dense"`` (BatchNorm folded, dense kernels: a baseline).
        max_density: Layers denser than this stay dense.
        fold_bn: Fold BatchNorm into the preceding convolutions.
        fuse: Fuse residual additions and ReLUs into the sparse layers before them.

    Returns:
        The converted model, in eval mode, on the CPU.

    Raises:
        ValueError: An unknown ``kernel``, or a mask that fits no layer.
        KernelBuildError: ``kernel`` is not ``"dense"`` and the kernels cannot be built here.
    """
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    if kernel != "dense":
        from granet_ray.inference.kernels import library

        library()  # build now: a missing compiler fails here, not in the first forward
    model = copy.deepcopy(unwrap(model)).cpu().float().eval()
    if masks is not None:
        apply_masks(model, masks)
    traced = None
    if fold_bn or fuse:
        traced = _trace(model, "BatchNorm not folded, activations not fused")
    if traced is not None:
        if fold_bn:
            _fold(traced)
        model = traced
    reasons: dict[str, str] = {}
    for name, module in list(model.named_modules()):
        if not isinstance(module, (_ConvNd, nn.Linear)):
            continue
        reason = _dense_reason(module, max_density)
        if reason is not None:
            reasons[name] = reason
            continue
        sparse: nn.Module
        if isinstance(module, nn.Conv2d):
            sparse = SparseConv2d(module, kernel=kernel)
        else:
            sparse = SparseLinear(module, kernel=kernel)
        _replace(model, name, sparse)
    if traced is not None and fuse:
        fuse_epilogues(traced)
    setattr(model, DENSE_REASONS, reasons)
    return model


@dataclass
class LayerChoice:
    """One Conv / Linear layer of a converted model and the path it runs per input shape.

    Attributes:
        name: Module name.
        kind: ``"3x3"``, ``"1x1"``, ``"7x7"``..., ``"depthwise"``, ``"grouped"`` or ``"fc"``.
        density: Fraction of nonzero weights.
        choices: Input shape to the choice made for it (empty before a forward in auto mode).
        dense_reason: Why the layer has no sparse kernel, or None.
    """

    name: str
    kind: str
    density: float
    choices: dict[tuple[int, ...], Choice]
    dense_reason: str | None = None


def layer_kind(module: nn.Module) -> str:
    """A layer's kind for reports: ``"fc"``, ``"depthwise"``, ``"grouped"``, ``"KHxKW"`` or,
    for other convolutions, the class name in lower case (``"conv1d"``).

    Args:
        module: A Conv / Linear layer or its sparse replacement.

    Returns:
        The kind.
    """
    if isinstance(module, (nn.Linear, SparseLinear)):
        return "fc"
    if not isinstance(module, (nn.Conv2d, SparseConv2d)):
        return type(module).__name__.lower()
    groups, channels = module.groups, module.in_channels
    if groups > 1:
        return "depthwise" if groups == channels else "grouped"
    kh, kw = module.kernel_size[0], module.kernel_size[-1]
    return f"{kh}x{kw}"


def layer_report(model: nn.Module) -> list[LayerChoice]:
    """The Conv / Linear layers of a converted model, in order, with their chosen paths.

    Args:
        model: A model from ``convert``.

    Returns:
        One entry per layer; shapes seen so far list their choice.
    """
    reasons = getattr(model, DENSE_REASONS, {})
    report = []
    for name, module in model.named_modules():
        if isinstance(module, (SparseConv2d, SparseLinear)):
            choices = {shape: choice for (shape, _), choice in module.choices.items()}
            if module.kernel != "auto":
                choices = {}
            report.append(LayerChoice(name, layer_kind(module), module.density, choices))
        elif isinstance(module, (_ConvNd, nn.Linear)):
            density = float(module.weight.count_nonzero()) / max(1, module.weight.numel())
            reason = reasons.get(name, "not converted")
            report.append(LayerChoice(name, layer_kind(module), density, {}, reason))
    return report
