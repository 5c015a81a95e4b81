"""What every command shares: the workspace option, the console, error reporting, the model options,
and the options of the library's option models (trace, generation) as flags.

A command's flags for an option model are declared with `field_option`, which takes the flag's
help and limits from the model's field, and the command's defaults are the model's
(`TRACE.max_docs`); `options_of(Model, locals())` builds the model from the command's values,
validated by the model (InputError naming the field and its limit). tests/test_options.py
checks that every field of the models has its flag with the model's default.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any, Optional, TypeVar

import typer
from pydantic import BaseModel
from rich.console import Console

from flexolmo.base.errors import InputError
from flexolmo.base.options import Options
from flexolmo.base.workspace import Workspace
from flexolmo.model.device import DEVICE, DTYPE
from flexolmo.model.generate import GenerationOptions
from tracing.options import TraceOptions

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

TRACE = TraceOptions()  # the defaults of the trace flags (tracing/options.py)
GEN = GenerationOptions()  # the defaults of the generation flags (flexolmo/model/generate.py)

M = TypeVar("M", bound=Options)


def _limits(field) -> str:
    """'0 to 100', 'over 0, at most 1', '1 or more' from a field's constraints ('' when none)."""
    lo = hi = None
    for m in field.metadata:
        for attr, word in (("ge", "at least"), ("gt", "over")):
            if getattr(m, attr, None) is not None:
                lo = (word, getattr(m, attr))
        for attr, word in (("le", "at most"), ("lt", "under")):
            if getattr(m, attr, None) is not None:
                hi = (word, getattr(m, attr))
    return ", ".join(f"{w} {v:,}" for w, v in (x for x in (lo, hi) if x))


def field_option(model: type[BaseModel], name: str, *decls: str) -> Any:
    """The typer option of `model`'s field `name`: `--name-with-dashes` (or `decls`), its help
    the field's description and limits. The command gives the model's default
    (`max_docs: Annotated[int, field_option(TraceOptions, "max_docs")] = TRACE.max_docs`)."""
    field = model.model_fields[name]
    limits = _limits(field)
    return typer.Option(*(decls or (f"--{name.replace('_', '-')}",)),
                        help=(field.description or "") + (f" ({limits})" if limits else ""))


def options_of(model: type[M], values: dict[str, Any], renamed: dict[str, str] | None = None) -> M:
    """`model` built from a command's values (its `locals()`): each field from the parameter of
    its name (or the one `renamed` maps to it), None meaning "the model's default"; validated."""
    renamed = renamed or {}
    by_field = {p: v for p, v in values.items() if p not in renamed.values()}
    by_field.update({f: values[p] for p, f in renamed.items() if p in values})
    return model.parse(**{f: by_field[f] for f in model.model_fields if by_field.get(f) is not None})


# the flags of `GenerationOptions`: `flexolmo generate` and `flexolmo trace --generate`
MaxNewTokensOpt = Annotated[int, field_option(GenerationOptions, "max_new_tokens", "--max-new-tokens", "-n")]
SampleOpt = Annotated[bool, field_option(GenerationOptions, "do_sample", "--sample/--greedy")]
TemperatureOpt = Annotated[float, field_option(GenerationOptions, "temperature")]
TopPOpt = Annotated[float, field_option(GenerationOptions, "top_p")]
TopKOpt = Annotated[Optional[int], field_option(GenerationOptions, "top_k")]
SeedOpt = Annotated[int, field_option(GenerationOptions, "seed")]

# the expert switches of `TraceOptions`: `flexolmo trace` and `flexolmo generate`
ExcludeOpt = Annotated[Optional[str], field_option(TraceOptions, "exclude")]
IncludeOpt = Annotated[Optional[str], field_option(TraceOptions, "include")]
