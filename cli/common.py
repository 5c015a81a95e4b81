"""What every command shares: the workspace option, the console, error reporting, the model options,
and the options of the library's option models (trace, generation) as flags.

A command takes an option model's fields as flags with `@with_options(TraceOptions, "options")`:
one flag per field, with the field's type, default, description and limits, handed to the
command as one validated `TraceOptions`, the model the API takes as its body and the library
as its argument. tests/test_options.py checks the three against each other.
"""

from __future__ import annotations

import functools
import inspect
import json
import sys
from pathlib import Path
from typing import Annotated, Any, Callable, Optional, Union, get_args, get_origin

import typer
from rich.console import Console

from flexolmo.base.errors import InputError
from flexolmo.base.options import Options
from flexolmo.base.workspace import Workspace
from flexolmo.model.device import DEVICE, DTYPE

console = Console()
err_console = Console(stderr=True)


# where a model computes and in which precision (flexolmo/model/device.py checks the values and
# holds the defaults: `device: DeviceOpt = DEVICE`)
_DEVICE_HELP = "cpu, cuda (cuda:N) or auto (cuda when a GPU is visible)."
_DTYPE_HELP = ("float32, or bfloat16 (for GPUs: training autocasts with float32 weights; tracing and generation "
               "load bfloat16 weights).")
DeviceOpt = Annotated[str, typer.Option("--device", help=_DEVICE_HELP)]
DtypeOpt = Annotated[str, typer.Option("--dtype", help=_DTYPE_HELP)]
# a service's: unset, the environment's value stands (api/deps.py reads it), else the default
EnvDeviceOpt = Annotated[Optional[str], typer.Option("--device", help=f"{_DEVICE_HELP} Default: $FLEXOLMO_DEVICE, "
                                                                     f"else {DEVICE}.")]
EnvDtypeOpt = Annotated[Optional[str], typer.Option("--dtype", help=f"{_DTYPE_HELP} Default: $FLEXOLMO_DTYPE, "
                                                                   f"else {DTYPE}.")]


class _State:
    workspace: str | None = None


state = _State()


def ws() -> Workspace:
    """The workspace chosen by --workspace, $FLEXOLMO_HOME or the default."""
    return Workspace.resolve(state.workspace)


def check_unicode(text: str, where: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:  # undecodable bytes in argv arrive as lone surrogates
        raise InputError(f"{where} is not valid UTF-8 text (character {e.start}); pass UTF-8 text") from None


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str, ensure_ascii=False) + "\n")


# -- which model a command runs: one set of options for trace, generate and serve -----------

ModelOpt = Annotated[Optional[Path], typer.Option(
    "--model", help="A Hugging Face model folder: the project's, a stock FlexOlmo checkpoint (e.g. the released "
                    "FlexOlmo-7x7B-1T) or any causal LM (spans and documents only). Default: the workspace's "
                    "merged model.")]
ExpertsOpt = Annotated[Optional[str], typer.Option(
    "--experts", help="A FlexOlmo model's expert names in expert order: 'public,math,news,...' or a JSON file "
                      "(default: its experts.json, else public, expert1, ...).")]


def model_spec(model: Path | None, experts: str | None, device: str, dtype: str):
    """The `flexolmo.model.loading.ModelSpec` of the --model/--experts/--device/--dtype options."""
    from flexolmo.model.loading import ModelSpec

    return ModelSpec.parse(model, experts, device, dtype)


# -- the option models' fields as flags -------------------------------------------------------


def _limits(field) -> str:
    """'at least 0, at most 100' from a field's constraints ('' when none)."""
    lo = hi = None
    for m in field.metadata:
        for attr, word in (("ge", "at least"), ("gt", "over")):
            if getattr(m, attr, None) is not None:
                lo = (word, getattr(m, attr))
        for attr, word in (("le", "at most"), ("lt", "under")):
            if getattr(m, attr, None) is not None:
                hi = (word, getattr(m, attr))
    return ", ".join(f"{w} {v:,}" for w, v in (x for x in (lo, hi) if x))


def _flag(name: str, field, decls: tuple[str, ...] | None) -> inspect.Parameter:
    """The command parameter of one field: its type, default, flag, help (description and limits)."""
    kind = field.annotation
    if get_origin(kind) is Union:  # Optional[X]
        kind = next(a for a in get_args(kind) if a is not type(None))
    if get_origin(kind) is tuple:  # names: given as 'a,b' (the model splits them)
        kind = str
    dashed = name.replace("_", "-")
    decls = decls or ((f"--{dashed}/--no-{dashed}",) if kind is bool else (f"--{dashed}",))
    limits = _limits(field)
    option = typer.Option(*decls, help=(field.description or "") + (f" ({limits})" if limits else ""))
    default = None if field.default is None or kind is str else field.default  # None: the model's default
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default,
                             annotation=Annotated[Optional[kind] if default is None else kind, option])


def _takes(param: str, added: list[inspect.Parameter], build: Callable[[dict[str, Any]], Any]):
    """A command decorator: the command gets the parameters `added` and receives
    `build({name: value})` of their values in its parameter `param` instead."""
    names = [p.name for p in added]

    def decorate(command):
        sig = inspect.signature(command, eval_str=True)  # typer reads the options from the annotations

        @functools.wraps(command)
        def run(*args, **kwargs):
            kwargs[param] = build({n: kwargs.pop(n) for n in names})
            return command(*args, **kwargs)

        run.__signature__ = sig.replace(parameters=[p for p in sig.parameters.values() if p.name != param] + added)
        return run

    return decorate


def with_options(model: type[Options], param: str, *, only: set[str] | None = None,
                 renamed: dict[str, str] | None = None, flags: dict[str, tuple[str, ...]] | None = None):
    """A command decorator: the command gets one flag per field of `model` (`--max-docs`: the
    field's type, default, description and limits) and receives them as one validated `model`
    in its parameter `param` (InputError naming a bad field and its limit).

    :param only: these fields only (default: all)
    :param renamed: field -> parameter name, where two models of one command share a name
    :param flags: field -> the flags to use instead of `--field-name` (e.g. ("--sample/--greedy",))
    """
    renamed, flags = renamed or {}, flags or {}
    names = {f: renamed.get(f, f) for f in model.model_fields if only is None or f in only}
    added = [_flag(p, model.model_fields[f], flags.get(f)) for f, p in names.items()]
    return _takes(param, added, lambda v: model.parse(**{f: v[p] for f, p in names.items() if v[p] is not None}))


def with_model(param: str = "spec"):
    """A command decorator: --model, --experts, --device and --dtype, received as one
    `flexolmo.model.loading.ModelSpec` in the command's parameter `param`."""
    added = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=option)
             for name, option, default in (("model", ModelOpt, None), ("experts", ExpertsOpt, None),
                                           ("device", DeviceOpt, DEVICE), ("dtype", DtypeOpt, DTYPE))]
    return _takes(param, added, lambda v: model_spec(**v))


# the generation's flags that are not `--field-name` (flexolmo generate, flexolmo trace --generate)
GENERATION_FLAGS = {"max_new_tokens": ("--max-new-tokens", "-n"), "do_sample": ("--sample/--greedy",)}
