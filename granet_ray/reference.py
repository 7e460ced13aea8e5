"""References to a user's own code: ``pkg.module:factory`` names a callable that builds a model
or the datasets, wherever a built-in name is taken (``TrainConfig.model`` and ``.dataset``,
flags, grid and preset files). The config keeps the reference as a string, so checkpoints,
resumes and sweeps record it, and every Ray worker imports the same one.

The module is imported as Python's ``-m`` would find it: from ``sys.path`` (``PYTHONPATH``,
installed packages) and, last, the current folder (Ray adds the driver's current folder to
its local workers' path too; ``ray job submit --working-dir .`` ships it to a cluster's).
Every way a reference can fail is a ``ConfigError`` of one line that names the field, the
reference and what is wrong. No Ray, no torch.
"""

from __future__ import annotations

import importlib
import os
import re
import sys
from collections.abc import Callable
from typing import Any

from granet_ray.config import ConfigError

# ``pkg.module:attr`` or ``pkg.module:Class.attr``: dotted identifiers on both sides.
_DOTTED = r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*"
REFERENCE = re.compile(rf"({_DOTTED}):({_DOTTED})")


def is_reference(name: str) -> bool:
    """Whether ``name`` is a reference (``something:something``) rather than a built-in name."""
    return isinstance(name, str) and ":" in name


def invalid(field: str, value: str, why: str) -> ConfigError:
    """The one-line error of a bad reference: ``<field>='<value>' is invalid: <why>``."""
    return ConfigError(f"{field}={value!r} is invalid: {why}")


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def _search_current_folder() -> None:
    """Let imports find modules in the current folder, after everything else on the path."""
    here = os.getcwd()
    if "" not in sys.path and here not in sys.path:
        sys.path.append(here)


def load_reference(field: str, reference: str) -> Callable[..., Any]:
    """The callable ``reference`` (``pkg.module:attr``) names, imported.

    Raises:
        ConfigError: naming ``field`` and the reference: not of the form ``pkg.module:attr``,
            no such module, the module raised on import, no such attribute, not callable.
    """
    match = REFERENCE.fullmatch(reference) if isinstance(reference, str) else None
    if match is None:
        raise invalid(field, reference, "must be a built-in name or pkg.module:factory")
    module_name, attr = match.groups()
    _search_current_folder()
    try:
        module = importlib.import_module(module_name)
    except Exception as err:
        name = getattr(err, "name", None) if isinstance(err, ModuleNotFoundError) else None
        if name is not None and f"{module_name}.".startswith(f"{name}."):
            raise invalid(
                field,
                reference,
                f"no module named {name!r} on the Python path (the current folder, "
                "PYTHONPATH, installed packages); Ray workers need it too: see "
                "docs/your-model.md",
            ) from None
        why = f"importing {module_name} raised {_one_line(err)}"
        raise invalid(field, reference, why) from None
    target: Any = module
    path = module_name
    for part in attr.split("."):
        if not hasattr(target, part):
            raise invalid(field, reference, f"{path} has no attribute {part!r}")
        target = getattr(target, part)
        path = f"{path}.{part}"
    if not callable(target):
        raise invalid(
            field, reference, f"{path} is a {type(target).__name__}, not a callable factory"
        )
    return target


def call_factory(field: str, reference: str, factory: Callable[..., Any], **kwargs: Any) -> Any:
    """``factory(**kwargs)``; anything it raises becomes a ``ConfigError`` naming the call."""
    call = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
    try:
        return factory(**kwargs)
    except Exception as err:
        raise invalid(field, reference, f"{reference}({call}) raised {_one_line(err)}") from None


__all__ = ["REFERENCE", "call_factory", "invalid", "is_reference", "load_reference"]
