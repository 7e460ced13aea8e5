"""What a checkpoint holds to resume a run, without Ray: RNG states, the JSON metadata, the
check that a checkpoint belongs to the resuming run, and the per-rank seeds."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from granet_ray.config import ConfigError, preset
from granet_ray.recipe import (
    Position,
    Sums,
    Totals,
    build_run,
    seed_everything,
    train_steps,
    worker_seed,
)
from granet_ray.resume import (
    check_resumable,
    checkpoint_metadata,
    checkpoint_name,
    restore,
    resume_latest,
    rng_state,
    save_checkpoint,
    set_rng_state,
)

TINY = preset("mnist_demo").replace(
    train_size=256,
    epochs=2,
    global_batch=32,
    lr_milestones=(),
    granet={"update_interval": 2, "prune_end": 1},
)


def test_rng_states_restore_exactly() -> None:
    seed_everything(3)
    state = json.loads(json.dumps(rng_state()))
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.rand(5), random.random(), np.random.rand()  # move on
    set_rng_state(state)
    again = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(expected[0], again[0]) and expected[1:] == again[1:]


def test_worker_seeds_differ_by_rank_and_step_and_repeat() -> None:
    seeds = [worker_seed(7, rank) for rank in range(4)]
    assert len(set(seeds)) == 4 and seeds == [worker_seed(7, rank) for rank in range(4)]
    assert worker_seed(8, 0) not in seeds and worker_seed(7, 0, 100) not in seeds


def test_checkpoint_names_sort_within_a_run() -> None:
    assert checkpoint_name(Position(3, 0), 100) == "checkpoint_epoch_0003"
    assert checkpoint_name(Position(2, 40), 100) == "checkpoint_epoch_0002_step_0040"
    names = [checkpoint_name(Position(e, s), 12345) for e, s in ((1, 0), (1, 9), (1, 10000))]
    assert names == sorted(names) and names[-1].endswith("step_10000")


def test_metadata_is_json_and_resume_needs_the_same_recipe() -> None:
    run = build_run(TINY, device=torch.device("cpu"))
    position = Position(1, 3, Totals(2.5, 7, 96), [{"epoch": 1}])
    meta = json.loads(json.dumps(checkpoint_metadata(run, position, [rng_state()])))
    assert (meta["epoch"], meta["step_in_epoch"], meta["totals"]) == (1, 3, [2.5, 7, 96])
    assert "masks" not in meta["engine"] and meta["world_size"] == 1
    check_resumable(meta, TINY)
    # how it runs may change (another data mount, accumulation, compilation)...
    check_resumable(meta, TINY.replace(max_batch_per_worker=8, compile=True, data_root="/x"))
    # ...what it computes may not
    changed = TINY.replace(lr=0.1, granet={"final_density": 0.2})
    with pytest.raises(ConfigError, match=r"^granet\.final_density, lr differ"):
        check_resumable(meta, changed)
    with pytest.raises(ConfigError, match="not written by granet-ray-train"):
        check_resumable({"kind": "other"}, TINY)


def test_restore_on_another_number_of_workers_reseeds_the_worker(tmp_path: Path) -> None:
    """Same world size: the worker's own RNG states come back; another: fresh ones from
    worker_seed(seed, rank, step), so no two workers of the new group repeat each other."""
    run = build_run(TINY, device=torch.device("cpu"))
    for info in train_steps(run, 0, Sums.zeros(run.device)):
        if info.step == 3:
            break
    uri = save_checkpoint(run, Position(0, 3), str(tmp_path / "ck"), [rng_state()])
    expected = torch.rand(4)
    same = build_run(TINY, device=torch.device("cpu"))
    resumed = restore(same, uri)
    assert torch.equal(torch.rand(4), expected)
    assert (resumed.position.epoch, resumed.position.step_in_epoch) == (0, 3)
    assert resumed.metadata["world_size"] == 1 and resumed.checkpoint == uri
    assert same.engine.step_count == 3
    two = build_run(TINY, device=torch.device("cpu"), rank=1, world=2)
    restore(two, uri)
    drawn = torch.rand(4)
    seed_everything(worker_seed(TINY.seed, 1, 3))
    assert torch.equal(drawn, torch.rand(4))
    for name, mask in run.engine.masks.items():
        assert torch.equal(two.engine.masks[name], mask)


def test_a_checkpoint_damaged_beyond_its_size_is_set_aside_on_resume(tmp_path: Path) -> None:
    """The newest checkpoint has a changed byte (sizes agree, the checksum does not): the run
    resumes from the one before, the damaged one is set aside, and its name can be written
    again when the run gets there."""
    run = build_run(TINY, device=torch.device("cpu"))
    uris = {}
    for info in train_steps(run, 0, Sums.zeros(run.device)):
        if info.step in (2, 3):
            name = checkpoint_name(Position(0, info.step), run.plan.steps_per_epoch)
            uris[info.step] = save_checkpoint(
                run, Position(0, info.step), str(tmp_path / name), [rng_state()]
            )
        if info.step == 3:
            break
    folder = Path(uris[3])
    data = next(folder.glob("model-csr-*.arrow"))
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 1
    data.write_bytes(bytes(raw))
    files = sorted(p.name for p in folder.iterdir())
    fresh = build_run(TINY, device=torch.device("cpu"))
    with pytest.warns(UserWarning, match=rf"^{uris[3]} held a damaged checkpoint \(.*sha256"):
        resumed = resume_latest(fresh, str(tmp_path))
    assert resumed is not None and resumed.checkpoint == uris[2]
    assert (resumed.position.step_in_epoch, fresh.engine.step_count) == (2, 2)
    [aside] = tmp_path.glob(f"{folder.name}.damaged-*")
    assert not folder.exists() and sorted(p.name for p in aside.iterdir()) == files
    assert (aside / data.name).read_bytes() == bytes(raw)
    save_checkpoint(run, Position(0, 3), uris[3], [rng_state()])
    again = build_run(TINY, device=torch.device("cpu"))
    assert getattr(resume_latest(again, str(tmp_path)), "checkpoint", None) == uris[3]
    assert resume_latest(again, str(tmp_path / "empty")) is None
