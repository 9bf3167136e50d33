"""Build the user's model from ``--model``: ``package.module:factory`` or ``path/to/file.py:factory``.

The factory is any callable (a function or a class) returning an
``nn.Module``; ``--model-args`` is a JSON object of keyword arguments.
Importing the user's code is the one place bntool runs code the user named,
never code from a checkpoint.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import InputError, named, user_exit
from .inputs import require_regular_file

EXAMPLE = "mypkg.models:resnet50 or path/to/models.py:resnet50"


def parse_kwargs(text: str | None, flag: str = "`model_args`") -> dict[str, Any]:
    """``'{"num_classes": 10}'`` -> ``{"num_classes": 10}``; a clear error for anything else."""
    flag = named(flag)
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"{flag} is not valid JSON ({exc.msg} at column {exc.colno}); pass e.g. '{{\"num_classes\": 10}}'") from None
    if not isinstance(value, dict):
        raise InputError(f"{flag} must be a JSON object of keyword arguments, e.g. '{{\"num_classes\": 10}}'")
    return value


def resolve_callable(spec: str, flag: str = "`model`") -> Any:
    """Import ``module:attr`` or ``file.py:attr`` and return the attribute."""
    flag = named(flag)
    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not attr:
        raise InputError(f"{flag} `{spec}` is not of the form module:factory; pass e.g. {EXAMPLE}")
    module = _import_file(target, flag) if target.endswith(".py") or os.sep in target else _import_module(target, flag)
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            available = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
            shown = ", ".join(available[:12]) or "none"
            raise InputError(f"{flag} `{spec}`: `{target}` has no `{attr}`; callables there: {shown}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise InputError(f"{flag} `{spec}`: `{attr}` is a {type(obj).__name__}, not a callable")
    return obj


def _import_module(name: str, flag: str) -> Any:
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name and (name == exc.name or name.startswith(exc.name + ".")):
            raise InputError(
                f"{flag}: cannot import `{name}` ({exc}); run bntool from the folder that contains it, "
                f"install its package, or pass a file path such as path/to/models.py:factory"
            ) from None
        raise InputError(f"{flag}: importing `{name}` failed: {exc}") from None
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # the user's module raised (or called sys.exit) while importing
        raise InputError(f"{flag}: importing `{name}` failed: it {user_exit(exc)}") from None


def _import_file(path_text: str, flag: str) -> Any:
    path = Path(path_text).expanduser()
    if not os.path.exists(path):
        raise InputError(f"{flag}: `{path}` does not exist; pass an existing .py file, e.g. {EXAMPLE}")
    require_regular_file(path, f"{flag} file", allow_empty=True)
    path = path.resolve()
    name = "bntool_user_" + hashlib.sha1(str(path).encode()).hexdigest()[:12]
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    if str(path.parent) not in sys.path:
        sys.path.insert(0, str(path.parent))
    try:
        spec.loader.exec_module(module)
    except KeyboardInterrupt:
        del sys.modules[name]
        raise
    except BaseException as exc:  # sys.exit() in the file is a failure to build, not bntool's exit
        del sys.modules[name]
        raise InputError(f"{flag}: running `{path}` failed: it {user_exit(exc)}") from None
    return module


def build(spec: str, kwargs: dict[str, Any] | None = None) -> nn.Module:
    """Call the factory named by ``spec`` with ``kwargs`` and check it returns a module."""
    factory = resolve_callable(spec)
    try:
        model = factory(**(kwargs or {}))
    except TypeError as exc:
        raise InputError(f"{named('`model`')} `{spec}` rejected its arguments: {exc}; check `model_args`") from None
    except KeyboardInterrupt:
        raise
    except BaseException as exc:
        raise InputError(f"{named('`model`')} `{spec}` {user_exit(exc)} instead of returning a model") from None
    if not isinstance(model, nn.Module):
        raise InputError(f"{named('`model`')} `{spec}` returned a {type(model).__name__}, not a torch.nn.Module")
    return model
