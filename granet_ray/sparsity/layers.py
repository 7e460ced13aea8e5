"""Which tensors are prunable, in any architecture (docs/algorithm.md, "Names").

Candidates are chosen by module type, never by matching names: the weight of every Conv*d and
Linear module (at least 2 dimensions) and the projection weights of ``nn.MultiheadAttention``
(``in_proj_weight``, or ``q_proj_weight`` / ``k_proj_weight`` / ``v_proj_weight`` when
separate; its ``out_proj`` is a Linear), each one tensor. Embeddings, normalization layers,
biases and buffers are never candidates. Each parameter is one entry under its own name (the
first under which ``named_parameters`` lists it), however many modules share it.

A candidate stays dense, with the reason recorded, when it is frozen
(``requires_grad=False``: no gradient, so regrowth could only pick positions that never
train), held by a module that is not a candidate type (a Linear tied to an ``nn.Embedding``),
the first convolution (``dense_first``), the last Linear (``dense_last``), or matches a
``keep_dense`` pattern (``fnmatch`` on the parameter name or the name of a module holding
it).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn
from torch.nn.modules.conv import _ConvNd

from granet_ray.config import ConfigError

ATTENTION_WEIGHTS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")


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
    a bare Conv / Linear model), in definition order (what sparse inference converts)."""
    return {
        f"{name}.weight" if name else "weight": module
        for name, module in unwrap(model).named_modules()
        if isinstance(module, (_ConvNd, nn.Linear)) and module.weight.dim() >= 2
    }


@dataclass(frozen=True)
class Weight:
    """One candidate weight. ``name``: its parameter name; ``module`` / ``module_name``: the
    first module (in definition order) that holds it; ``kind``: ``conv``, ``linear`` or
    ``attention``; ``dense``: why it stays dense (None: prunable); ``shared``: the other
    modules that hold the same parameter."""

    name: str
    param: nn.Parameter
    module: nn.Module
    module_name: str
    kind: str
    dense: str | None = None
    shared: tuple[str, ...] = ()

    @property
    def prunable(self) -> bool:
        return self.dense is None


def _join(prefix: str, attr: str) -> str:
    return f"{prefix}.{attr}" if prefix else attr


def candidate_weights(module: nn.Module) -> list[tuple[str, str]]:
    """(attribute, kind) of ``module``'s own candidate weights: ``weight`` of a Conv*d or
    Linear, the projection weights of an ``nn.MultiheadAttention``; none for other modules."""
    if isinstance(module, _ConvNd) and module.weight.dim() >= 2:
        return [("weight", "conv")]
    if isinstance(module, nn.Linear) and module.weight.dim() >= 2:
        return [("weight", "linear")]
    if isinstance(module, nn.MultiheadAttention):
        return [
            (attr, "attention")
            for attr in ATTENTION_WEIGHTS
            if isinstance(getattr(module, attr, None), nn.Parameter)
        ]
    return []


def weight_table(
    model: nn.Module,
    *,
    dense_first: bool = False,
    dense_last: bool = False,
    keep_dense: Sequence[str] = (),
) -> dict[str, Weight]:
    """Every candidate weight of the plain model by parameter name, in definition order, with
    why it stays dense (see the module's doc). ``ConfigError`` when a ``keep_dense`` pattern
    matches no candidate (a typo would otherwise prune what was meant to stay dense)."""
    net = unwrap(model)
    names = {id(p): n for n, p in net.named_parameters()}
    holders: dict[int, list[tuple[str, nn.Module]]] = {}
    for module_name, module in net.named_modules(remove_duplicate=False):
        for _, param in module.named_parameters(recurse=False):
            holders.setdefault(id(param), []).append((module_name, module))
    table: dict[str, Weight] = {}
    for module_name, module in net.named_modules():
        for attr, kind in candidate_weights(module):
            param = getattr(module, attr)
            name = names.get(id(param), _join(module_name, attr))
            if name in table:
                continue
            owners = [(m, mod) for m, mod in holders.get(id(param), []) if m != module_name]
            shared = tuple(dict.fromkeys(m for m, _ in owners))
            others = [
                f"{m} ({type(mod).__name__})" for m, mod in owners if not candidate_weights(mod)
            ]
            dense = None
            if not param.requires_grad:
                dense = "frozen"
            elif others:
                dense = f"shared with {others[0]}"
            table[name] = Weight(name, param, module, module_name, kind, dense, shared)
    matched = dict.fromkeys(keep_dense, False)
    for name, weight in table.items():
        keys = (name, weight.module_name, *weight.shared)
        for pattern in keep_dense:
            if any(fnmatch.fnmatchcase(k, pattern) for k in keys):
                matched[pattern] = True
                if weight.dense is None:
                    table[name] = _dense(weight, f"keep_dense {pattern!r}")
                break
    unmatched = [p for p, hit in matched.items() if not hit]
    if unmatched:
        listed = ", ".join(list(table)[:6]) + (", ..." if len(table) > 6 else "")
        raise ConfigError(
            f"keep_dense={tuple(keep_dense)!r} is invalid: {unmatched[0]!r} matches no "
            f"Conv / Linear / attention weight or its module (weights: {listed})"
        )
    convs = [n for n, w in table.items() if w.kind == "conv"]
    linears = [n for n, w in table.items() if w.kind == "linear"]
    if dense_first and convs and table[convs[0]].dense is None:
        table[convs[0]] = _dense(table[convs[0]], "dense_first")
    if dense_last and linears and table[linears[-1]].dense is None:
        table[linears[-1]] = _dense(table[linears[-1]], "dense_last")
    return table


def _dense(weight: Weight, reason: str) -> Weight:
    return Weight(
        weight.name,
        weight.param,
        weight.module,
        weight.module_name,
        weight.kind,
        reason,
        weight.shared,
    )


def prunable_parameters(
    model: nn.Module,
    *,
    dense_first: bool = False,
    dense_last: bool = False,
    keep_dense: Sequence[str] = (),
) -> dict[str, nn.Parameter]:
    """Prunable weights by parameter name (``weight_table`` less those that stay dense):
    Conv*d / Linear weights and attention projections, each parameter once."""
    table = weight_table(
        model, dense_first=dense_first, dense_last=dense_last, keep_dense=keep_dense
    )
    return {n: w.param for n, w in table.items() if w.prunable}
