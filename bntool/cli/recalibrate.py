"""``bntool recalibrate`` (also under ``torchrun --nproc-per-node N -m bntool recalibrate ...``)."""

from __future__ import annotations

import os
from typing import Annotated, Any, Optional

import typer

from .app import app
from .options import (
    AllowPickleOpt,
    BatchSizeOpt,
    CheckpointArg,
    DataArgsOpt,
    DataOpt,
    DeviceOpt,
    DryRunOpt,
    ExcludeOpt,
    ForceOpt,
    ImageSizeOpt,
    IncludeOpt,
    InputKeyOpt,
    JsonOpt,
    KeyOpt,
    MeanOpt,
    ModelArgsOpt,
    ModelOpt,
    OutOpt,
    StdOpt,
    StripPrefixOpt,
)

NumBatchesOpt = Annotated[
    Optional[int], typer.Option("--num-batches", metavar="N", help="Use only the first N batches. Default: all of them.")
]
VerifyBatchesOpt = Annotated[
    int,
    typer.Option("--verify-batches", metavar="N", help="Hold out N batches after the calibration batches and report how close each "
                 "BN's normalised input comes to mean 0 / variance 1 there, before and after."),
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar and no tables; errors only.")]
AllowTf32Opt = Annotated[
    bool,
    typer.Option("--allow-tf32", help="Run the pass with TF32 on (cuDNN convolutions and cuBLAS matmuls, GPU only): "
                 "the statistics of a model deployed with TF32. Default: off, exact float32."),
]


@app.command()
def recalibrate(
    checkpoint: CheckpointArg,
    data: DataOpt,
    model: ModelOpt = None,
    model_args: ModelArgsOpt = None,
    key: KeyOpt = None,
    allow_pickle: AllowPickleOpt = False,
    strip_prefix: StripPrefixOpt = True,
    data_args: DataArgsOpt = None,
    batch_size: BatchSizeOpt = 32,
    image_size: ImageSizeOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    input_key: InputKeyOpt = None,
    num_batches: NumBatchesOpt = None,
    verify_batches: VerifyBatchesOpt = 0,
    include: IncludeOpt = None,
    exclude: ExcludeOpt = None,
    device: DeviceOpt = "auto",
    allow_tf32: AllowTf32Opt = False,
    out: OutOpt = None,
    force: ForceOpt = False,
    dry_run: DryRunOpt = False,
    json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Recompute every BatchNorm's running statistics over real data: exact population mean and variance.

    Only the BN layers run in training mode (dropout and the rest stay in
    eval), statistics are accumulated in float64 over every value each BN sees,
    and every other parameter and buffer is checked to be bit-identical. Under
    torchrun each process takes every N-th batch, the statistics are reduced
    across processes, and process 0 writes the file. Frozen BNs (bntool
    freeze) are recalibrated too and stay frozen; empty batches are skipped.
    """
    import torch

    from ..data.batches import plan_batches
    from ..data.sources import load_batches
    from ..errors import VerificationError
    from ..recalibration.recalibrate import recalibrate as recalibrate_model
    from . import console
    from .common import Loading, Operation, image_options, run_operation

    group: dict[str, Any] | None = None
    rank, world_size = 0, 1

    def prepare(target):
        nonlocal group, rank, world_size
        group = _init_distributed(target)
        rank, world_size = (group["rank"], group["world_size"]) if group else (0, 1)
        operation.rank = rank
        return torch.device("cuda", group["local_rank"]) if group and target.type == "cuda" else target

    def inputs(source, target):
        batches = load_batches(data, batch_size=batch_size, data_args=data_args, input_key=input_key,
                               **image_options(image_size, mean, std))
        plan = plan_batches(batches, num_batches=num_batches, verify_batches=verify_batches, rank=rank,
                            world_size=world_size)
        counted = _Counted(plan.calibration)
        shown = console.progress(counted, total=plan.total, description="Recalibrating",
                                 enabled=not quiet and rank == 0, samples=lambda: counted.samples)
        return shown, plan.verification

    def fields(source, target):
        return {"device": str(target), "tf32": allow_tf32 and target.type == "cuda",
                "backend": group["backend"] if group else None}

    def operate(source, batches, target):
        shown, verification = batches
        work = source.model.to(target)
        return work, recalibrate_model(work, shown, input_key=input_key, include=include or None,
                                       exclude=exclude or None, verify_batches=verification, allow_tf32=allow_tf32)

    operation = Operation(
        "recalibrate", Loading(checkpoint, model, model_args, key, allow_pickle, strip_prefix), operate,
        lambda result, report: _render(result, report, json, quiet), as_json=json, device=device, out=out,
        suffix="recalibrated", force=force, dry_run=dry_run, data=data, valid="weights", prepare=prepare,
        inputs=inputs, lead={"data": str(data)}, fields=fields,
        failed=lambda exc: VerificationError(f"{exc}; nothing was written", exc.report))
    try:
        run_operation(operation)
        if group:
            import torch.distributed as dist

            dist.barrier()
    except BaseException:
        # No teardown on failure: a peer may already be gone, and tearing the group down then can
        # abort this process before the error reaches the user. The process is exiting anyway.
        raise
    else:
        if group and group["created"]:
            import torch.distributed as dist

            dist.destroy_process_group()


class _Counted:
    """Pass batches through, counting samples for the progress bar's rate and keeping the first one."""

    def __init__(self, batches: Any):
        self.batches, self.samples, self.first = batches, 0, None

    def __iter__(self):
        from ..data.batches import batch_size_of

        for batch in self.batches:
            self.samples += batch_size_of(batch)
            if self.first is None:
                self.first = batch
            yield batch


def _init_distributed(target: Any) -> dict[str, Any] | None:
    """Join the torchrun process group (gloo on CPU, NCCL on GPU) when started by torchrun (any number of processes).

    On a GPU each process needs a GPU of its own: more processes on this
    machine than GPUs is refused before any process waits for another.
    """
    if not all(key in os.environ for key in ("LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")):
        return None
    import torch
    import torch.distributed as dist

    from ..errors import InputError

    local_rank = int(os.environ["LOCAL_RANK"])
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", local_rank + 1))
    created = not dist.is_initialized()
    if target.type == "cuda":
        gpus = torch.cuda.device_count()
        if max(local_world, local_rank + 1) > gpus:
            raise InputError(
                f"torchrun started {local_world} processes on this machine but {gpus} CUDA GPU(s) are visible, and "
                f"each process needs a GPU of its own; pass --nproc-per-node {gpus} (or fewer), or --device cpu "
                "to reduce on the CPU (gloo)")
    if created:
        if target.type == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if target.type == "cuda" else "gloo")
    return {"rank": dist.get_rank(), "world_size": dist.get_world_size(), "local_rank": local_rank, "created": created,
            "backend": str(dist.get_backend())}


def _fmt(value: float | None, spec: str = ".3g") -> str:
    return "" if value is None else format(value, spec)


def _render(result: dict, report: Any, as_json: bool, quiet: bool) -> None:
    from . import console

    if as_json:
        console.print_json(result)
        return
    if quiet:
        return
    verified = report.verify_batches > 0
    columns = ["BatchNorm", "calls", "values/ch", "Δmean/std", "Δvar rel", "batch-var gap"]
    if verified:
        columns += ["|mean| before→after", "|var-1| before→after"]
    rows = []
    for layer in report.layers:
        note = " (now tracking)" if layer.converted else " (frozen, stays frozen)" if layer.frozen else ""
        row = [layer.name + note, layer.calls, layer.count,
               _fmt(layer.mean_change), _fmt(layer.var_change), f"{layer.batch_var_gap:.2%}"]
        if verified:
            for attr in ("mean_error", "var_error"):
                before = getattr(layer.verify_before, attr, None)
                after = getattr(layer.verify_after, attr, None)
                row.append(f"{_fmt(before) or '-'} → {_fmt(after) or '-'}")
        rows.append(row)
    console.table(f"Recalibrated {len(rows)} BatchNorm layer(s)", columns, rows)
    if report.skipped:
        console.table(f"Left {len(report.skipped)} BatchNorm layer(s) as they are", ["BatchNorm", "reason"],
                      [[s.name, s.reason] for s in report.skipped])
    where = f" on {report.world_size} processes" if report.world_size > 1 else ""
    precision = ", TF32 on" if result.get("tf32") else ""
    console.line(f"{report.num_batches} batches, {report.num_samples} samples{where} ({result['device']}{precision}). "
                 "Averaging per-batch variances instead would have been off by up to "
                 f"{report.mean_of_batch_vars_vs_population:.2%}.")
    if report.empty_batches:
        console.line(f"Skipped {report.empty_batches} empty batch(es) (0 samples): they carry no statistics.")
    if report.converted:
        console.line("Now tracking running statistics (were track_running_stats=False): " + ", ".join(report.converted))
    if verified:
        console.line(f"Checked on {report.verify_batches} held-out batches (eval mode).")
    if report.unchanged_non_bn:
        console.success("Every parameter and buffer other than the BatchNorm statistics is bit-identical.")
    else:
        console.failure("Changed outside BatchNorm statistics: " + ", ".join(report.changed_non_bn[:10]))
    if result.get("written"):
        console.success(f"Wrote {result['output']} (reloaded and checked before it was renamed into place).")
    elif result.get("dry_run", False):
        console.line("Dry run: nothing written.")
