"""``bntool fold`` / ``inspect`` / ``export`` of a ``torch.export`` program (``.pt2``): no ``--model`` needed.

The commands hand a ``.pt2`` input here; the program carries its own graph.
Imported inside the commands (it imports torch).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from ..errors import InputError, VerificationError
from ..folding.fold import FoldReport
from ..folding.program import plan_program
from ..folding.program_fold import fold_program, program_inputs
from ..graph.program import ProgramGraph
from ..graph.program_layers import layer_of
from ..inspection.inspect import inspect
from ..io import outputs
from ..io.programfile import is_program_file, read_program, write_program
from ..runtime.shapes import parse_shape
from ..verify.program import flat_inputs, run_program
from . import console
from .common import shown_on_failure


def _no_model(path: Path, model: str | None) -> None:
    if model is not None:
        raise InputError(f"`{path}` is a torch.export program, which carries its own graph; drop --model")


def _shapes(input_shape: list[str] | None) -> list[tuple[int, ...]] | None:
    return [parse_shape(s) for s in input_shape] if input_shape else None


def fold_file(path: Path, *, model: str | None, out: Path | None, force: bool, dry_run: bool, strict: bool,
              input_shape: list[str] | None, seed: int, atol: float | None, rtol: float | None, json: bool,
              allow_pickle: bool, render) -> None:
    """``bntool fold program.pt2 --out folded.pt2``: fold, verify, write (loaded back and checked first)."""
    _no_model(path, model)
    out = out or path.with_name(f"{path.stem}.folded.pt2")
    if not dry_run:
        if not is_program_file(out):
            raise InputError(f"--out `{out}` must end in .pt2 (the folded program is a torch.export program)")
        outputs.check_output_path(out, force=force, inputs=[(path, "the input program")])
    program = read_program(path, allow_pickle=allow_pickle)
    shapes = _shapes(input_shape)
    if shapes and program.example_inputs is not None:
        console.warning("the program stores its example inputs, which are used for verification; --input-shape "
                        "is ignored")
    result: dict[str, Any] = {"command": "fold", "input": str(path), "model": None, "output": None,
                              "written": False, "dry_run": dry_run}
    with shown_on_failure(result, lambda result, report: render(result, report, json)):
        folded, report = fold_program(program, None, input_shapes=shapes, seed=seed, atol=atol, rtol=rtol,
                                      strict=strict, report_type=FoldReport)
    result.update(report.to_dict())
    if not dry_run:
        flat = flat_inputs(program, program_inputs(program, None, shapes, seed))
        expected, _ = run_program(folded, flat)

        def same_outputs(loaded) -> None:
            got, _ = run_program(loaded, flat)
            if len(got) != len(expected) or not all(
                    torch.equal(a, b) for a, b in zip(got, expected) if isinstance(a, torch.Tensor)):
                raise VerificationError("the written program does not compute what the verified one does; nothing "
                                        "was written")

        written = write_program(folded, out, force=force, inputs=[path], check=same_outputs)
        result.update(output=str(written), written=True)
    render(result, report, json)


def inspect_file(path: Path, *, model: str | None, allow_pickle: bool, json: bool, render) -> None:
    """``bntool inspect program.pt2``: every BN node, what feeds it and what it feeds, whether it folds and why not,
    and the statistics findings."""
    _no_model(path, model)
    program = read_program(path, allow_pickle=allow_pickle)
    tensors = {**{k: v for k, v in program.constants.items() if isinstance(v, torch.Tensor)}, **program.state_dict}
    report = dataclasses.replace(inspect(tensors), note=(
        "a torch.export program: statistics are read from its tensors (eps and momentum are in its graph); the "
        "table below shows each BN node, what feeds it and whether it folds"))
    planned = plan_program(program)
    pg = ProgramGraph(program)
    folds = {p.bn: p for p in planned.plan.pairs}
    nodes = []
    for site in pg.bn_sites():
        pair, reason = folds.get(site.name), planned.plan.reason_for(site.name)
        readers = list(site.output.users) if site.output is not None else []
        nodes.append({"bn": site.name, "node": site.node.name, "op": str(site.node.target),
                      "fed_by": _shown(pg, site.input), "feeds": [_shown(pg, r) for r in readers],
                      "training": site.training, "folds_into": pair.into if pair else None,
                      "direction": pair.direction if pair else None, "reason": None if pair else reason})
    result = {"command": "inspect", "input": str(path), "model": None, "weights_only": True, **report.to_dict(),
              "program": nodes, "plot": None}
    render(result, report, json)
    if json:
        return
    console.table(f"BatchNorm nodes of the program ({len(nodes)}) and folding",
                  ["BatchNorm", "node", "fed by", "feeds", "fold"],
                  [[n["bn"] or "(root)", n["node"], n["fed_by"], ", ".join(n["feeds"]),
                    f"yes, {n['direction']} into {n['folds_into']}" if n["folds_into"] else f"no: {n['reason']}"]
                   for n in nodes])


def _shown(pg: ProgramGraph, node) -> str:
    if layer_of(pg, node) is not None:
        return f"{pg.layer_name(node)} ({node.name})"
    return node.name if node.op != "output" else "(output)"


def export_file(path: Path, *, model: str | None, out: Path | None, allow_pickle: bool, input_shape, seed: int,
                atol, rtol, force: bool, fold: bool, options: dict[str, Any]):
    """``bntool export program.pt2 --out model.onnx``: the program folded, exported and proven; the report."""
    from ..export.program import export_program

    _no_model(path, model)
    out = out or path.with_suffix(".onnx")
    outputs.check_output_path(out, force=force, inputs=[(path, "the input program")])
    program = read_program(path, allow_pickle=allow_pickle)
    return export_program(program, out, input_shapes=_shapes(input_shape), fold=fold, seed=seed, atol=atol,
                          rtol=rtol, force=force, **options)
