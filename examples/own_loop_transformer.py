"""GraNet in your own Ray Train loop: a small transformer language model on a token stream.

Everything here is ordinary user code (the model, the data, the loss, the loop, the
``TorchTrainer``) except three calls from ``granet_ray.train``:

- ``prepare_engine``: the sparse-training engine for this worker group (masks seeded alike on
  every worker, scores averaged, masks compared exactly after every update, the sparse
  all-reduce on the DDP model);
- ``report``: metrics plus an Arrow CSR checkpoint through ``ray.train.report``;
- ``restore``: model, optimizer, engine and LR schedule back from the last checkpoint when
  Ray restarts the worker group.

The model is a causal transformer (``nn.TransformerEncoder``, whose ``nn.MultiheadAttention``
projections are pruned like any Linear layer) trained on next-token prediction over a
synthetic stream drawn from a fixed random Markov chain, so it has something to learn.

    python examples/own_loop_transformer.py --workers 2 --steps 40
    python examples/own_loop_transformer.py --workers 2 --crash-at 15   # recovery demo

``--crash-at STEP`` ends worker 1's process abruptly after that step, once: Ray restarts the
group and the loop continues from its last checkpoint. Ray: ``$RAY_ADDRESS`` or a local one.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from granet_ray import GraNetConfig
from granet_ray.train import prepare_engine, report, restore

VOCAB = 32
CONTEXT = 16


class TinyLM(nn.Module):
    """A pre-norm causal transformer language model: token and position embeddings, encoder
    layers with a causal mask, a final norm and a linear head over the vocabulary."""

    def __init__(self, vocab: int = VOCAB, dim: int = 64, heads: int = 4, layers: int = 2):
        super().__init__()
        self.tokens = nn.Embedding(vocab, dim)
        self.position = nn.Parameter(torch.randn(CONTEXT, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(
            dim, heads, 4 * dim, dropout=0.0, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        length = tokens.shape[1]
        x = self.tokens(tokens) + self.position[:length]
        causal = nn.Transformer.generate_square_subsequent_mask(length, device=tokens.device)
        x = self.encoder(x, mask=causal, is_causal=True)
        return self.head(self.norm(x))


def token_batch(seed: int, step: int, rows: int) -> torch.Tensor:
    """``rows`` windows of ``CONTEXT + 1`` tokens of the stream: a Markov chain whose
    transition table comes from ``seed`` (each token has 3 likely successors), started at a
    random token; the windows of step ``step`` are the same in every process."""
    table = torch.Generator().manual_seed(seed)
    successors = torch.randint(VOCAB, (VOCAB, 3), generator=table)
    draw = torch.Generator().manual_seed(seed * 1_000_003 + step)
    tokens = torch.empty(rows, CONTEXT + 1, dtype=torch.long)
    tokens[:, 0] = torch.randint(VOCAB, (rows,), generator=draw)
    for i in range(1, CONTEXT + 1):
        pick = torch.randint(3, (rows,), generator=draw)
        tokens[:, i] = successors[tokens[:, i - 1], pick]
    return tokens


def probe_tokens() -> torch.Tensor:
    """A fixed batch to compare the trained model's outputs with a loaded checkpoint's."""
    return token_batch(seed=12345, step=0, rows=2)[:, :CONTEXT]


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """One worker of the data-parallel run: each global step is ``global_batch`` windows,
    this worker taking its contiguous share."""
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.manual_seed(config["seed"])  # the same initial weights everywhere
    model = ray.train.torch.prepare_model(TinyLM())
    optimizer = torch.optim.AdamW(model.parameters(), lr=config["lr"], weight_decay=0.01)
    steps = config["steps"]
    warmup = max(1, steps // 10)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / steps)),
    )
    granet = GraNetConfig(
        method="granet",
        init_density=0.5,
        final_density=config["density"],
        update_interval=config["update_interval"],
        prune_start=0,
        prune_end=steps // 2,  # in steps: prepare_engine's steps_per_epoch is 1
        seed=config["seed"],
    )
    engine = prepare_engine(model, optimizer, granet, total_steps=steps)
    state = restore(model, optimizer, engine, scheduler=scheduler) or {"step": 0}
    resumed_from = state["step"]
    share = config["global_batch"] // world
    model.train()
    for step in range(state["step"], steps):
        batch = token_batch(config["seed"], step, config["global_batch"])
        batch = batch[rank * share : (rank + 1) * share]
        logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), batch[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        engine.step()
        crash = config.get("crash_at")
        if crash is not None and step + 1 == crash and rank == 1:
            marker = Path(config["crash_marker"])
            if not marker.exists():
                marker.touch()
                os._exit(1)  # a real crash: Ray restarts the worker group
        done = step + 1
        if done % config["report_every"] == 0 or done == steps:
            metrics: dict[str, Any] = {
                "step": done,
                "loss": float(loss),
                "density": engine.density(),
                "resumed_from": resumed_from,
            }
            if done == steps:
                metrics.update(final_metrics(model, engine, world))
            report(
                metrics,
                model=model,
                engine=engine,
                optimizer=optimizer,
                scheduler=scheduler,
                state={"step": done},
            )


def final_metrics(model: nn.Module, engine: Any, world: int) -> dict[str, Any]:
    """Every worker's digest of its masks (they must agree) and the model's outputs on the
    probe batch."""
    packed = b"".join(engine.masks[n].cpu().numpy().tobytes() for n in sorted(engine.masks))
    digests: list[Any] = [hashlib.sha256(packed).hexdigest()] * world
    if world > 1:
        dist.all_gather_object(digests, digests[0])
    net = getattr(model, "module", model)  # the plain model inside DDP
    net.eval()
    with torch.no_grad():
        probe = net(probe_tokens())
    net.train()
    return {"mask_digests": digests, "probe_logits": probe.flatten().tolist()}


def main(argv: list[str] | None = None) -> ray.train.Result:
    """Parse the flags, run the ``TorchTrainer`` and print where the checkpoint is."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--global-batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--density", type=float, default=0.2, help="final density")
    parser.add_argument("--update-interval", type=int, default=4)
    parser.add_argument("--report-every", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--storage", default=os.path.join(tempfile.gettempdir(), "own-loop"))
    parser.add_argument("--name", default="own-loop-transformer")
    parser.add_argument("--crash-at", type=int, help="worker 1 crashes after this step, once")
    args = parser.parse_args(argv)
    storage = os.path.abspath(args.storage)
    config = {
        "steps": args.steps,
        "global_batch": args.global_batch,
        "lr": args.lr,
        "density": args.density,
        "update_interval": args.update_interval,
        "report_every": args.report_every,
        "seed": args.seed,
        "crash_at": args.crash_at,
        "crash_marker": os.path.join(storage, f"{args.name}.crashed"),
    }
    os.makedirs(storage, exist_ok=True)
    if not ray.is_initialized():
        ray.init()
    trainer = ray.train.torch.TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config,
        scaling_config=ray.train.ScalingConfig(num_workers=args.workers),
        run_config=ray.train.RunConfig(
            name=args.name,
            storage_path=storage,
            failure_config=ray.train.FailureConfig(max_failures=1),
        ),
    )
    result = trainer.fit()
    m = result.metrics
    print(
        f"step {m['step']}: loss {m['loss']:.3f}, density {m['density']:.4f}, "
        f"resumed from step {m['resumed_from']}; checkpoint {result.checkpoint.path}"
    )
    return result


if __name__ == "__main__":
    main()
