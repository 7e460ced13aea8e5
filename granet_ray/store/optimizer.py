"""Optimizer state keyed by parameter name, the form ``save_sparse`` stores.

torch's ``optimizer.state_dict()`` keys state by parameter index; a checkpoint keys it by the
parameter's state-dict name so the weight-shaped state can share that weight's CSR pattern:
``{"state": {name: {key: tensor | number}}, "param_groups": [{..., "params": [names]}]}``.
Pure functions, no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from granet_ray.store.errors import InvalidInputError, ModelMismatchError


def _index_names(
    optimizer: torch.optim.Optimizer,
    named_parameters: Iterable[tuple[str, torch.Tensor]],
    indexed_groups: list[dict[str, Any]],
) -> dict[int, str]:
    names = {id(p): n for n, p in named_parameters}
    out: dict[int, str] = {}
    for live, indexed in zip(optimizer.param_groups, indexed_groups, strict=True):
        for param, index in zip(live["params"], indexed["params"], strict=True):
            if id(param) not in names:
                raise InvalidInputError(
                    f"optimizer parameter {index} (shape {tuple(param.shape)}) is not among "
                    "named_parameters"
                )
            out[index] = names[id(param)]
    return out


def optimizer_state_by_name(
    optimizer: torch.optim.Optimizer, named_parameters: Iterable[tuple[str, torch.Tensor]]
) -> dict[str, Any]:
    """``optimizer.state_dict()`` re-keyed by parameter name (names from ``named_parameters``,
    e.g. ``model.named_parameters()``). Tensors are the optimizer's own, not copies."""
    indexed = optimizer.state_dict()
    names = _index_names(optimizer, named_parameters, indexed["param_groups"])
    return {
        "state": {names[i]: dict(s) for i, s in indexed["state"].items()},
        "param_groups": [
            {
                **{k: v for k, v in g.items() if k != "params"},
                "params": [names[i] for i in g["params"]],
            }
            for g in indexed["param_groups"]
        ],
    }


def optimizer_state_from_names(
    state_by_name: dict[str, Any],
    optimizer: torch.optim.Optimizer,
    named_parameters: Iterable[tuple[str, torch.Tensor]],
) -> dict[str, Any]:
    """The torch ``state_dict`` for ``optimizer.load_state_dict()`` from a by-name state.

    Raises ModelMismatchError when the groups or parameter names differ from ``optimizer``'s.
    """
    current = optimizer.state_dict()
    index_of = {
        name: index
        for index, name in _index_names(
            optimizer, named_parameters, current["param_groups"]
        ).items()
    }
    groups = state_by_name.get("param_groups")
    if not isinstance(groups, list) or len(groups) != len(current["param_groups"]):
        raise ModelMismatchError(
            f"the saved optimizer state has {len(groups) if isinstance(groups, list) else 'no'} "
            f"param group(s), the optimizer has {len(current['param_groups'])}"
        )
    out_groups = []
    for number, (saved, live) in enumerate(zip(groups, current["param_groups"], strict=True)):
        params = saved.get("params", [])
        if sorted(params) != sorted(n for n, i in index_of.items() if i in live["params"]):
            raise ModelMismatchError(
                f"param group {number}: saved parameters {params} differ from the optimizer's"
            )
        # JSON turned tuples (Adam's betas) into lists: restore the optimizer's own types.
        group = {
            k: tuple(v) if isinstance(live.get(k), tuple) and isinstance(v, list) else v
            for k, v in saved.items()
        }
        # torch maps saved indices to live parameters by position: keep the live order.
        out_groups.append({**group, "params": list(live["params"])})
    state = {}
    for name, entry in state_by_name.get("state", {}).items():
        if name not in index_of:
            raise ModelMismatchError(f"saved optimizer state for {name!r}, not an optimizer param")
        state[index_of[name]] = dict(entry)
    return {"state": state, "param_groups": out_groups}
