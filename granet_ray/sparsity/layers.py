"""Which tensors are prunable: the weights of Conv*d and Linear modules, chosen by module type."""

from __future__ import annotations

from torch import nn
from torch.nn.modules.conv import _ConvNd


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside any nesting of DataParallel, DistributedDataParallel and
    ``torch.compile`` (its ``_orig_mod``), else the model itself: parameter and state-dict
    names are then the same whatever wraps the model, so checkpoints interchange."""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def weight_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Conv*d and Linear modules by weight name (``"<module>.weight"``, plain ``"weight"`` for
    a bare Conv / Linear model), in definition order."""
    return {
        f"{name}.weight" if name else "weight": module
        for name, module in unwrap(model).named_modules()
        if isinstance(module, (_ConvNd, nn.Linear)) and module.weight.dim() >= 2
    }


def prunable_parameters(
    model: nn.Module, *, dense_first: bool = False, dense_last: bool = False
) -> dict[str, nn.Parameter]:
    """Prunable weights by name: every Conv*d / Linear weight, less the first conv
    (``dense_first``) and the last linear layer (``dense_last``), which stay dense."""
    layers = weight_layers(model)
    skip: set[str] = set()
    convs = [n for n, m in layers.items() if isinstance(m, _ConvNd)]
    linears = [n for n, m in layers.items() if isinstance(m, nn.Linear)]
    if dense_first and convs:
        skip.add(convs[0])
    if dense_last and linears:
        skip.add(linears[-1])
    return {n: m.weight for n, m in layers.items() if n not in skip}
