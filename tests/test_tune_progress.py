"""The sweep's live display: one status per trial report, also for mid-epoch checkpoints."""

from __future__ import annotations

from granet_ray.tune.progress import trial_summary


def test_trial_summary_of_every_kind_of_report() -> None:
    assert trial_summary({}, 3) == "no report"
    epoch = {"epoch": 2, "step": 126, "val_accuracy": 0.9512, "density": 0.1}
    assert trial_summary(epoch, 3) == "epoch 2/3 val acc 95.12% density 0.1000"
    mid = {"epoch": 1, "step": 80, "step_in_epoch": 17}  # --checkpoint-every-steps
    assert trial_summary(mid, 3) == "epoch 1/3, checkpoint at step 80"
