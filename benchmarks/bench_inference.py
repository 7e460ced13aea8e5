"""Sparse CPU inference (``granet_ray.inference.convert``) against dense torch, side by side.

ResNet-50 (torchvision, random init: nothing is downloaded) pruned by the engine's own global
magnitude pruning (``global_magnitude_prune``, as GMP / GraNet with global pruning) to
densities 0.2 / 0.1 / 0.05 / 0.02, at batch 1 and 32 on 1 and 2 threads: whole-model latency
of the converted model against the dense masked model (BatchNorm not folded: what a user runs
today), median and spread of interleaved repeats; then per kind of layer (3x3, 1x1, fc, ...)
the summed latency of the path each layer chose and of the sparse kernel alone, against dense
torch and against ``torch.sparse`` CSR matmul (im2col for KxK). Last, the MNIST demo's own
checkpoint: the demo recipe (``granet-ray train --preset mnist_demo``: GraNet to 90 % sparsity
on MNIST-5k, about a minute on 2 CPU cores) is trained in a temporary folder, unless
``--mnist-checkpoint URI`` names one, and its final checkpoint loaded with ``load_sparse``.
Goal: >= 1.5x at density 0.1 and >= 3x at 0.02 for ResNet-50 at batch 32 on 2 threads.

Usage: python benchmarks/bench_inference.py [--repeats 5] [--densities 0.2 0.1 0.05 0.02]
       [--threads 1 2] [--batches 1 32] [--no-csr] [--mnist-checkpoint URI]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from granet_ray.inference import kernels
from granet_ray.inference.bench import ModelBench, benchmark, by_kind
from granet_ray.models import build_model
from granet_ray.sparsity import TieBreak, global_magnitude_prune, prunable_parameters
from granet_ray.store import latest_checkpoint, load_sparse


def engine_masks(model: torch.nn.Module, density: float) -> dict[str, torch.Tensor]:
    """Masks from the engine's global magnitude pruning of all prunable weights."""
    weights = {name: p.detach() for name, p in prunable_parameters(model).items()}
    full = {name: torch.ones_like(w, dtype=torch.bool) for name, w in weights.items()}
    return global_magnitude_prune(weights, full, density, TieBreak(0, 0))


def spread(values: list[float], scale: float = 1.0) -> str:
    """``median [min-max]`` of values times ``scale``."""
    scaled = [v * scale for v in values]
    return f"{statistics.median(scaled):7.2f} [{min(scaled):.2f}-{max(scaled):.2f}]"


def print_model(label: str, result: ModelBench) -> None:
    print(
        f"{label:>8} b{result.batch:<3} t{result.threads}  dense {spread(result.dense_s, 1e3)} ms"
        f"  sparse {spread(result.sparse_s, 1e3)} ms  speedup {spread(result.speedups)}"
        f"  best/best {result.best_speedup:.2f}"
    )


def print_kinds(result: ModelBench) -> None:
    for kind, row in sorted(by_kind(result.layers).items()):
        csr = row.get("csr_s")
        versus_csr = f"{csr / row['sparse_s']:6.2f}x" if csr else "     -"
        print(
            f"{'':>14}{kind:>6}: {row['sparse_layers']:2d}/{row['layers']:<2d} sparse | "
            f"dense {row['dense_s'] * 1e3:8.2f} ms  chosen {row['chosen_s'] * 1e3:8.2f} ms "
            f"({row['dense_s'] / row['chosen_s']:5.2f}x) | kernel {row['sparse_s'] * 1e3:8.2f} ms"
            f" ({row['dense_s'] / row['sparse_s']:5.2f}x dense, {versus_csr} CSR"
            + (f" {csr * 1e3:.2f} ms)" if csr else ")")
        )
    dense = [f"{layer.name} ({layer.reason})" for layer in result.layers if layer.reason]
    chose_dense = [
        f"{layer.name} {layer.kind} d={layer.density:.3f}"
        for layer in result.layers
        if layer.reason is None and layer.kernel == "dense"
    ]
    if dense:
        print(f"{'':>14}not converted: {len(dense)}: " + "; ".join(dense[:4]) + " ...")
    if chose_dense:
        print(f"{'':>14}timed dense: " + ", ".join(chose_dense))


def densities_by_kind(model: torch.nn.Module, masks: dict[str, torch.Tensor]) -> str:
    from granet_ray.inference import layer_kind
    from granet_ray.sparsity.layers import weight_layers

    kept: dict[str, list[int]] = {}
    for name, layer in weight_layers(model).items():
        total = kept.setdefault(layer_kind(layer), [0, 0])
        total[0] += int(masks[name].sum()) if name in masks else layer.weight.numel()
        total[1] += layer.weight.numel()
    return ", ".join(f"{kind} {a / b:.3f}" for kind, (a, b) in sorted(kept.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="whole-model repeats (batch>1)")
    parser.add_argument(
        "--densities", type=float, nargs="*", default=[0.2, 0.1, 0.05, 0.02], help="none: skip"
    )
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--no-csr", action="store_true", help="skip torch.sparse CSR timing")
    parser.add_argument("--mnist-checkpoint", help="a checkpoint of the MNIST demo to use")
    args = parser.parse_args()

    start = time.perf_counter()
    print(f"kernels: {kernels.isa()}  torch {torch.__version__}  cpus {torch.get_num_threads()}")
    torch.manual_seed(0)
    resnet = build_model("resnet50").eval()
    shape = (3, 224, 224)
    summary = []
    for density in args.densities:
        masks = engine_masks(resnet, density)
        print(
            f"\nResNet-50, global magnitude density {density}: {densities_by_kind(resnet, masks)}"
        )
        for threads in args.threads:
            for batch in args.batches:
                repeats = args.repeats if batch > 1 else 4 * args.repeats
                (result,) = benchmark(
                    resnet,
                    masks,
                    shape,
                    batches=(batch,),
                    threads=threads,
                    repeats=repeats,
                    layer_repeats=3 if batch > 1 else 10,
                    csr_repeats=0 if args.no_csr else (1 if batch > 1 else 5),
                )
                print_model(f"d={density}", result)
                print_kinds(result)
                summary.append((density, result))

    print("\nMNIST demo checkpoint (GraNet, mnist_demo preset, 90 % sparsity):")
    with tempfile.TemporaryDirectory() as folder:
        uri = args.mnist_checkpoint
        if uri is None:
            train = (
                "from granet_ray.cli import main; raise SystemExit(main(['train', '--preset', "
                f"'mnist_demo', '--device', 'cpu', '--storage', {folder!r}, '--name', 'demo', "
                "'--no-progress']))"
            )
            subprocess.run([sys.executable, "-c", train], check=True, capture_output=True)
            uri = latest_checkpoint(folder)
        fresh = build_model("mnist_convnet")
        checkpoint = load_sparse(uri, model=fresh)
        print(f"checkpoint {uri}")
        for threads in args.threads:
            for result in benchmark(
                fresh,
                checkpoint.masks,
                (1, 28, 28),
                batches=args.batches,
                threads=threads,
                repeats=20 * args.repeats,
                layer_repeats=10,
                csr_repeats=0 if args.no_csr else 5,
            ):
                print_model("mnist", result)
                print_kinds(result)
                summary.append(("mnist", result))

    print(
        "\nSummary: whole-model speedup over dense torch, median [min-max] of the repeats'"
        " dense/sparse pairs; best/best: fastest dense over fastest sparse run"
    )
    for label, result in summary:
        print(
            f"  {label!s:>6}  batch {result.batch:<3} threads {result.threads}  "
            f"{spread(result.speedups)}  best/best {result.best_speedup:.2f}"
        )
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
