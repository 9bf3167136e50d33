"""The flags: the one place that knows how the command line names what the library calls a parameter.

Library messages name Python parameters in backticks. At the error boundary
(``cli.main``) ``for_cli`` replaces each name in ``FLAGS`` (names no file or
layer is likely to share) in the finished message; the names in ``NAMED``,
which a message could also quote as a file's name (`` `out` ``, `` `model` ``),
are never replaced in text: the library spells them with ``errors.named``,
and ``main`` runs every command under ``errors.naming(NAMED)``.
"""

from __future__ import annotations

import re

#: Python parameter, as library messages spell it -> the command-line flag that sets it
FLAGS = {
    "`example_inputs`": "--input-shape",
    "`input_shapes`": "--input-shape",
    "`atol` / `rtol`": "--atol / --rtol",
    "`allow_pickle=True`": "--allow-pickle",
    "`strip_prefix=False`": "--no-strip-prefix",
    "`model_args`": "--model-args",
    "`force=True`": "--force",
    "`include`": "--include",
    "`exclude`": "--exclude",
    "`data_args`": "--data-args",
    "`batch_size`": "--batch-size",
    "`num_batches`": "--num-batches",
    "`verify_batches`": "--verify-batches",
    "`input_key`": "--input-key",
    "`image_size`": "--image-size",
    "`mean`": "--mean",
    "`verify_batch_sizes`": "--verify-batch-sizes",
    "`dynamic_batch=True`": "--dynamic-batch",
    "`external_data=False`": "--embed-weights",
    "`keep_on_fail=True`": "--keep-on-fail",
    "`opset`": "--opset",
    "`std`": "--std",
    "`to`": "--to",
}
#: parameters given a value in messages, ``device="cpu"`` -> ``--device cpu``
VALUED = ("device", "key", "exporter")
#: parameters spelt through ``errors.named`` -> the flag; the output is ``out`` to ``bntool.save``, the model spec
#: ``model`` to the builder and the data ``source`` to ``load_batches``
NAMED = {**FLAGS, "`out`": "--out", "`model`": "--model", "`source`": "--data"}
#: what ``bntool inspect --plot`` names while it draws: the image's ``path`` and the function
PLOT_NAMED = {"`path`": "--plot", "`bntool.plot`": "--plot"}

_PARAMETER = re.compile("|".join(re.escape(k) for k in sorted(FLAGS, key=len, reverse=True)))
_VALUED = re.compile(r'`({})="([^"`]*)"`'.format("|".join(VALUED)))


def for_cli(message: str) -> str:
    """``message`` as the command line says it: each Python parameter named by the flag that sets it."""
    message = _VALUED.sub(lambda m: f"--{m.group(1)}" + (f" {m.group(2)}" if m.group(2) != "..." else ""), message)
    return _PARAMETER.sub(lambda m: FLAGS[m.group(0)], message)
