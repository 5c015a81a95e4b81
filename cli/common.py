"""What every command shares: the workspace option, the console, error reporting, the model options."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console

from flexolmo.base.errors import InputError
from flexolmo.base.workspace import Workspace
from flexolmo.model.generate import GenerationOptions

console = Console()
err_console = Console(stderr=True)


# where a model computes and in which precision (flexolmo/model/device.py checks the values)
DeviceOpt = Annotated[str, typer.Option("--device", help="cpu, cuda (cuda:N) or auto (cuda when a GPU is visible).")]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="float32, or bfloat16 (for GPUs: training autocasts with "
                                                           "float32 weights; tracing and generation load bfloat16 "
                                                           "weights).")]


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


# -- how a response is generated: `flexolmo generate` and `flexolmo trace --generate` alike ------

MaxNewTokensOpt = Annotated[int, typer.Option("--max-new-tokens", "-n", help="Tokens to generate.")]
SampleOpt = Annotated[bool, typer.Option("--sample", help="Sample (see --temperature, --top-p, --top-k, --seed); "
                                                          "else greedy.")]
TemperatureOpt = Annotated[float, typer.Option(help="With --sample: the sampling temperature.")]
TopPOpt = Annotated[float, typer.Option(help="With --sample: the nucleus mass.")]
TopKOpt = Annotated[Optional[int], typer.Option(help="With --sample: the k most likely tokens only (default 50).")]
SeedOpt = Annotated[int, typer.Option(help="With --sample: the random seed.")]


GEN = GenerationOptions()  # the defaults of the options above, defined once (flexolmo/model/generate.py)


def generation_options(max_new_tokens: int, sample: bool, temperature: float, top_p: float, top_k: int | None,
                       seed: int) -> GenerationOptions:
    """The `GenerationOptions` of the generation options above (validated: InputError names a bad one)."""
    return GenerationOptions.parse(max_new_tokens=max_new_tokens, do_sample=sample, temperature=temperature,
                                   top_p=top_p, top_k=top_k, seed=seed)
