"""One rank of the two-process gloo tests: ``python tests/_dist_worker.py RANK WORLD INIT_FILE OUT [fail]``.

Builds the same model and batches as the test, takes its share with
``bntool.data.batches.plan_batches`` (rank r: batches i with i % world == r),
recalibrates under a gloo process group and saves its state dict and report.
"""

from __future__ import annotations

import os
import sys

import torch
from torch import nn


def build_model() -> nn.Module:
    from examples.models import randomize_bn_, resnet_small

    torch.manual_seed(0)
    model = resnet_small()
    # a SyncBatchNorm without running statistics: converted on every rank, local statistics merged exactly
    model.extra = nn.SyncBatchNorm(3, track_running_stats=False)
    forward = model.forward
    model.forward = lambda x: forward(model.extra(x))
    return randomize_bn_(model, seed=12)


def make_batches() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(n, 3, 12, 12, generator=gen) * 1.3 + 0.5 * i for i, n in enumerate((6, 4, 7, 5, 3))]


def main() -> None:
    import torch.distributed as dist

    from bntool.data.batches import plan_batches
    from bntool.recalibration.recalibrate import recalibrate

    rank, world, init_file, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    fail = sys.argv[5:] == ["fail"]  # rank 1 gets a batch of the wrong shape; rank 0 must not wait forever
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        plan = plan_batches(make_batches(), rank=rank, world_size=world)
        mine = list(plan.calibration)
        if fail and rank == 1:
            mine[-1] = torch.randn(2, 5, 12, 12)
        model = build_model()
        try:
            report = recalibrate(model, mine)
        except Exception as exc:
            print(f"rank {rank}: {type(exc).__name__}: {exc}", flush=True)
            # No teardown: the peer may already have closed its side, and gloo aborts a process whose
            # destroy_process_group races with that. What is under test has happened; leave at once.
            os._exit(3)
        torch.save({"state": model.state_dict(), "report": report.to_dict(), "batches_seen": len(mine)}, out)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
