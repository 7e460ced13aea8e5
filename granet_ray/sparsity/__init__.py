"""GraNet's sparsity core: pure torch, no Ray, no I/O, no torch.distributed."""

from granet_ray.sparsity.allocation import (
    active_count,
    erk_densities,
    initial_masks,
    uniform_densities,
)
from granet_ray.sparsity.criteria import (
    TieBreak,
    active_counts,
    global_magnitude_prune,
    keep_top,
    kth_largest,
    layerwise_magnitude_prune,
    prune_and_regrow,
    random_scores,
    regrow_count,
)
from granet_ray.sparsity.engine import GraNet, LocalSync, MaskSync, neutral_state_keys
from granet_ray.sparsity.flops import FlopsRecorder, forward_flops, relative_flops
from granet_ray.sparsity.layers import prunable_parameters, unwrap, weight_layers
from granet_ray.sparsity.schedules import pruning_updates, regrow_fraction, target_density
from granet_ray.sparsity.seeding import layer_generator, layer_seed, random_keys

__all__ = [
    "FlopsRecorder",
    "GraNet",
    "LocalSync",
    "MaskSync",
    "TieBreak",
    "active_count",
    "active_counts",
    "erk_densities",
    "forward_flops",
    "global_magnitude_prune",
    "initial_masks",
    "keep_top",
    "kth_largest",
    "layer_generator",
    "layer_seed",
    "layerwise_magnitude_prune",
    "neutral_state_keys",
    "prunable_parameters",
    "prune_and_regrow",
    "pruning_updates",
    "random_keys",
    "random_scores",
    "regrow_count",
    "regrow_fraction",
    "relative_flops",
    "target_density",
    "uniform_densities",
    "unwrap",
    "weight_layers",
]
