"""Options shared by the subcommands, as ``Annotated`` aliases. Flags are the API's keyword names."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

CheckpointArg = Annotated[
    Path,
    typer.Argument(
        metavar="CHECKPOINT",
        help="Checkpoint to read: .safetensors, or .pt/.pth/.bin/.ckpt (a state dict or a training "
        "checkpoint holding one). It is never modified.",
        show_default=False,
    ),
]
ModelOpt = Annotated[
    Optional[str],
    typer.Option(
        "--model",
        metavar="SPEC",
        help="Code that builds the network: package.module:factory or path/to/file.py:factory.",
        show_default=False,
    ),
]
ModelArgsOpt = Annotated[
    Optional[str],
    typer.Option("--model-args", metavar="JSON", help='Keyword arguments for the factory, as JSON: \'{"num_classes": 10}\'.'),
]
KeyOpt = Annotated[
    Optional[str],
    typer.Option("--key", metavar="KEY", help="Where the state dict sits in a training checkpoint (e.g. state_dict, model, a.b)."),
]
AllowPickleOpt = Annotated[
    bool,
    typer.Option(
        "--allow-pickle",
        help="Allow a .pt file that needs arbitrary unpickling (runs code from the file: trusted files only).",
    ),
]
StripPrefixOpt = Annotated[
    bool,
    typer.Option(
        "--strip-prefix/--no-strip-prefix",
        help="Remove wrapper prefixes such as module. (DataParallel/DDP) and _orig_mod. (torch.compile).",
    ),
]
OutOpt = Annotated[
    Optional[Path],
    typer.Option("--out", "-o", metavar="PATH", help="Output file (.safetensors or .pt). Default: beside the input.", show_default=False),
]
ForceOpt = Annotated[bool, typer.Option("--force", "-f", help="Replace --out if it exists.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one machine-readable JSON report on stdout.")]
DryRunOpt = Annotated[bool, typer.Option("--dry-run", help="Do and verify everything, but write nothing.")]
DeviceOpt = Annotated[
    str, typer.Option("--device", metavar="DEVICE", help="Where to verify: auto (a CUDA GPU when present), cpu, cuda or cuda:N.")
]
InputShapeOpt = Annotated[
    Optional[list[str]],
    typer.Option(
        "--input-shape",
        metavar="SHAPE",
        help="Shape of a verification input, e.g. 1,3,224,224; repeat for several inputs. "
        "Default: the shape the model declares (input_shape / example_input_array).",
        show_default=False,
    ),
]
SeedOpt = Annotated[int, typer.Option("--seed", metavar="INT", help="Seed of the random verification inputs.")]
AtolOpt = Annotated[
    Optional[float],
    typer.Option("--atol", metavar="FLOAT", help="Absolute tolerance; with --rtol replaces the tolerance derived from the model."),
]
RtolOpt = Annotated[Optional[float], typer.Option("--rtol", metavar="FLOAT", help="Relative tolerance (see --atol).")]

# Data options shared by the commands that read real inputs (recalibrate, export).
DataOpt = Annotated[
    Optional[str],
    typer.Option(
        "--data",
        metavar="SOURCE",
        help="Real inputs: a tensor file (.pt, .safetensors, .npy, .npz) of inputs stacked along dim 0, a folder of "
        "images, or package.module:factory / path/file.py:factory returning an iterable of batches.",
        show_default=False,
    ),
]
BatchSizeOpt = Annotated[
    int, typer.Option("--batch-size", metavar="N", help="Samples per batch read from --data (a tensor file or an image folder).")
]
DataArgsOpt = Annotated[
    Optional[str],
    typer.Option("--data-args", metavar="JSON", help='Keyword arguments for a --data factory, as JSON: \'{"split": "val"}\'.'),
]
InputKeyOpt = Annotated[
    Optional[str], typer.Option("--input-key", metavar="KEY", help="Which entry of a dict batch (or file) is the model input.")
]
ImageSizeOpt = Annotated[
    Optional[str],
    typer.Option("--image-size", metavar="SIZE", help="Resize images to SIZE or H,W (image folders).", show_default=False),
]
MeanOpt = Annotated[
    Optional[str],
    typer.Option("--mean", metavar="FLOATS", help="Per-channel mean to subtract from images in [0, 1], e.g. 0.485,0.456,0.406.",
                 show_default=False),
]
StdOpt = Annotated[
    Optional[str],
    typer.Option("--std", metavar="FLOATS", help="Per-channel std to divide images by, e.g. 0.229,0.224,0.225.", show_default=False),
]

# Layer selection shared by freeze, unfreeze and recalibrate (--only is the older name of --include).
IncludeOpt = Annotated[
    Optional[list[str]],
    typer.Option(
        "--include",
        "--only",
        metavar="PATTERN",
        help="Only BatchNorm layers whose qualified name (or a parent's) matches this fnmatch pattern, "
        "e.g. 'layer1.*' or backbone; repeat for several (--only is the same). Default: every one the command "
        "applies to.",
        show_default=False,
    ),
]
ExcludeOpt = Annotated[
    Optional[list[str]],
    typer.Option("--exclude", metavar="PATTERN",
                 help="Leave layers matching this pattern as they are (wins over --include); repeatable.",
                 show_default=False),
]
# The same selection for the commands that never had --only (fold, export).
SelectIncludeOpt = Annotated[
    Optional[list[str]],
    typer.Option(
        "--include",
        metavar="PATTERN",
        help="Only BatchNorm layers whose qualified name (or a parent's) matches this fnmatch pattern, "
        "e.g. 'layer1.*' or backbone; repeat for several. Default: every one the command applies to.",
        show_default=False,
    ),
]
