"""What GraNet prunes in three architectures, and what masking costs a CPU training step.

For ResNet-50 (torchvision), ViT-Tiny (``timm:vit_tiny_patch16_224``) and ConvNeXt-Atto
(``timm:convnext_atto``), built as ``granet-ray`` builds them (``build_model``):

- the share of parameters that is prunable (``sparsity.layers.weight_table``: Conv / Linear
  weights and attention projections; embeddings, norms, biases and tokens stay dense);
- the density of each kind of weight after ERK at 10% overall (conv k x k, 1 x 1, depthwise;
  attention qkv / in_proj and output projections; MLP linears; the classifier);
- the masked / dense time of one training step (forward, backward, AdamW step, and for the
  masked model ``engine.step()`` at 90% sparsity, no mask update) on the CPU: the two models
  step in turn, so both see the same machine load; the ratio of the median step times, and
  the median, quartiles and range of the per-pair ratios over the repeats.

Run: .venv/bin/python benchmarks/bench_models.py [--batch 8] [--repeats 9] [--json out.json]
(needs the timm extra: pip install 'granet-ray[timm]').
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import torch
from rich.table import Table
from torch import nn

from granet_ray.config import GraNetConfig
from granet_ray.models import build_model
from granet_ray.sparsity import GraNet, erk_densities
from granet_ray.sparsity.layers import Weight, weight_table
from granet_ray.ui import console as default_console

MODELS = {
    "ResNet-50": "resnet50",
    "ViT-Tiny": "timm:vit_tiny_patch16_224",
    "ConvNeXt-Atto": "timm:convnext_atto",
}
NEVER = 10**9  # an update interval no step reaches
STATIC = GraNetConfig(method="static", final_density=0.1, update_interval=NEVER, prune_end=NEVER)


def weight_kind(weight: Weight, last_linear: str) -> str:
    """A finer kind than the engine's, for the table: convolutions by shape, linears by role
    (timm's attention blocks name theirs ``qkv`` and ``proj``)."""
    shape = tuple(weight.param.shape)
    if weight.kind == "attention":
        return "attention in_proj"
    if weight.kind == "conv":
        groups = getattr(weight.module, "groups", 1)
        if groups > 1 and shape[1] == 1:
            return "conv depthwise"
        if groups > 1:
            return "conv grouped"
        spatial = "x".join(str(s) for s in shape[2:])
        return "conv 1x1" if all(s == 1 for s in shape[2:]) else f"conv {spatial}"
    if weight.name == last_linear:
        return "linear classifier"
    if weight.module_name.endswith("qkv"):
        return "attention qkv"
    if weight.module_name.endswith(("attn.proj", "out_proj")):
        return "attention out"
    return "linear (MLP)"


def composition(model: nn.Module) -> tuple[float, dict[str, tuple[int, float]]]:
    """(prunable share of all parameters, {kind: (weights, density after ERK at 0.1)})."""
    table = weight_table(model)
    total = sum(p.numel() for p in model.parameters())
    prunable = {n: w for n, w in table.items() if w.prunable}
    share = sum(w.param.numel() for w in prunable.values()) / total
    densities = erk_densities({n: tuple(w.param.shape) for n, w in prunable.items()}, 0.1)
    linears = [n for n, w in prunable.items() if w.kind == "linear"]
    kinds: dict[str, list[float]] = {}
    for name, weight in prunable.items():
        numel = weight.param.numel()
        count = kinds.setdefault(weight_kind(weight, linears[-1] if linears else ""), [0, 0.0])
        count[0] += numel
        count[1] += round(densities[name] * numel)
    return share, {k: (int(n), active / n) for k, (n, active) in sorted(kinds.items())}


def step_times(name: str, batch: int, repeats: int) -> tuple[list[float], list[float]]:
    """Seconds of one training step of the dense and the masked model, one pair per repeat
    (after one warm-up pair), the models stepping in turn."""
    size = 224
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 1000, (batch,), generator=torch.Generator().manual_seed(1))
    runs = []
    for masked in (False, True):
        torch.manual_seed(0)
        model = build_model(name, num_classes=1000)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        engine = None
        if masked:
            engine = GraNet(model, optimizer, STATIC, total_steps=NEVER, steps_per_epoch=1)
        runs.append((model, optimizer, engine))
    times: list[list[float]] = [[], []]
    for i in range(repeats + 1):
        for j, (model, optimizer, engine) in enumerate(runs):
            start = time.perf_counter()
            loss = nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if engine is not None:
                engine.step()
            if i > 0:  # the first pair warms up
                times[j].append(time.perf_counter() - start)
    return times[0], times[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8, help="images per training step")
    parser.add_argument("--repeats", type=int, default=9, help="step pairs per model (>= 2)")
    parser.add_argument(
        "--models", nargs="+", choices=list(MODELS), default=list(MODELS), help="which ones"
    )
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args()
    console = default_console()
    report: dict[str, Any] = {}
    kinds_table = Table(title="density per kind of weight after ERK at 10% overall")
    for column in ("model", "kind", "weights", "density"):
        kinds_table.add_column(column, justify="left" if column in ("model", "kind") else "right")
    summary = Table(
        title=f"prunable share and masked / dense CPU step time (batch {args.batch}, "
        f"{torch.get_num_threads()} threads, {args.repeats} pairs)"
    )
    columns = ("model", "parameters", "prunable", "dense step", "masked / dense (medians)")
    for column in (*columns, "pair ratios: median \\[q1-q3] (min-max)"):
        summary.add_column(column, justify="left" if column == "model" else "right")
    for label in args.models:
        name = MODELS[label]
        model = build_model(name, num_classes=1000)
        share, kinds = composition(model)
        params = sum(p.numel() for p in model.parameters())
        for kind, (numel, density) in kinds.items():
            kinds_table.add_row(label, kind, f"{numel:,}", f"{density:.4f}")
        with console.status(f"{label}: dense and masked training steps"):
            dense, masked = step_times(name, args.batch, args.repeats)
        ratios = [m / d for d, m in zip(dense, masked, strict=True)]
        of_medians = statistics.median(masked) / statistics.median(dense)
        q1, median, q3 = statistics.quantiles(ratios, n=4)
        summary.add_row(
            label,
            f"{params / 1e6:.2f} M",
            f"{share:.1%}",
            f"{statistics.median(dense):.3f} s",
            f"{of_medians:.3f}",
            f"{median:.3f} [{q1:.3f}-{q3:.3f}] ({min(ratios):.3f}-{max(ratios):.3f})",
        )
        report[label] = {
            "model": name,
            "parameters": params,
            "prunable_share": share,
            "kinds": {k: {"weights": n, "density": d} for k, (n, d) in kinds.items()},
            "dense_seconds": dense,
            "masked_seconds": masked,
            "ratio_of_medians": of_medians,
            "pair_ratios": ratios,
        }
    console.print(kinds_table)
    console.print(summary)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
