"""One definition per option set: the CLI's flags, the API's bodies and the library's defaults
are the option models' (`TraceOptions`, `GenerationOptions`, `DocumentWindow`, the device and
dtype defaults), so none can drift from the others.

    .venv/bin/python -m pytest tests/test_options.py -q
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path

import click
import pytest
import typer
from typer.testing import CliRunner

from cli.main import app as cli
from flexolmo.model.device import DEVICE, DTYPE
from flexolmo.model.generate import GenerationOptions
from index.options import WINDOW, DocumentWindow
from tracing.options import TraceOptions

COMMANDS = typer.main.get_command(cli).commands


def _params(command: str) -> dict[str, click.Parameter]:
    return {p.name: p for p in COMMANDS[command].params}


def _bounds(model, name: str) -> dict[str, object]:
    """A field's limits: {'ge': 0, 'le': 100}."""
    return {k: getattr(m, k) for m in model.model_fields[name].metadata for k in ("ge", "gt", "le", "lt")
            if getattr(m, k, None) is not None}


# (command, model, field -> CLI parameter where the names differ, fields the command does not take)
FLAGS = [
    ("trace", TraceOptions, {"seed": "docs_seed"}, set()),
    ("trace", GenerationOptions, {}, set()),
    ("generate", GenerationOptions, {}, set()),
    ("generate", TraceOptions, {}, set(TraceOptions.model_fields) - {"exclude", "include"}),  # experts off only
]


@pytest.mark.parametrize("command,model,renamed,skipped", FLAGS, ids=[f"{c}-{m.__name__}" for c, m, _, _ in FLAGS])
def test_cli_flags_are_the_option_models_fields_with_their_defaults_and_help(command, model, renamed, skipped):
    params = _params(command)
    for name, field in model.model_fields.items():
        if name in skipped:
            continue
        p = params.get(renamed.get(name, name))
        assert p is not None, f"`flexolmo {command}` has no flag for {model.__name__}.{name}"
        assert p.help.startswith(field.description), (name, p.help)
        limits = _bounds(model, name)
        for v in limits.values():  # the help states the limits (from the model: cli/common.py field_option)
            assert f"{v:,}" in p.help, (name, p.help)
    # every default of the command is the model's (None: the flag leaves the model's default)
    defaults = {f: params[renamed.get(f, f)].default for f in model.model_fields if f not in skipped}
    assert model.parse(**{f: v for f, v in defaults.items() if v is not None}) == model()


def test_cli_limits_are_the_models(tmp_path, monkeypatch):
    """Past each limit the command stops before opening anything, naming the field and the limit."""
    monkeypatch.setenv("FLEXOLMO_HOME", str(tmp_path / "none"))
    flag_of = {"seed": "--docs-seed"}
    cases = [(m, name, b) for m in (TraceOptions, GenerationOptions) for name in m.model_fields
             for b in _bounds(m, name).items() if not (m is GenerationOptions and name == "seed")]
    assert len(cases) >= 15
    for model, name, (kind, v) in cases:
        flag = flag_of.get(name, "--" + name.replace("_", "-")) if model is TraceOptions else "--" + name.replace("_", "-")
        past = {"ge": v - 1, "gt": v, "le": v + 1, "lt": v}[kind]
        past = int(past) if isinstance(v, int) else past
        r = CliRunner().invoke(cli, ["trace", "--text", "x", flag, str(past)])
        assert r.exit_code == 1 and f"{name}: Input should be" in r.output and f"{v}" in r.output, (flag, past, r.output)
    assert not (tmp_path / "none").exists()


def test_api_bodies_are_the_option_models(tmp_path):
    from api.app import create_app
    from flexolmo.base.workspace import Workspace

    spec = create_app(Workspace(tmp_path).ensure()).openapi()["components"]["schemas"]

    def ref(body: str, field: str) -> str:
        (r,) = [x["$ref"] for x in spec[body]["properties"][field]["anyOf"] if "$ref" in x]
        return r.rsplit("/", 1)[-1]

    # no private shorthand beside the models: each option is said one way (`store` is the request's
    # own: whether the service keeps the trace, not an option of the trace)
    assert set(spec["TraceRequest"]["properties"]) == {"text", "prompt", "options", "store"}
    assert set(spec["GenerateRequest"]["properties"]) == {"prompt", "generation", "options", "store"}
    assert ref("TraceRequest", "options") == ref("GenerateRequest", "options") == "TraceOptions"
    assert ref("GenerateRequest", "generation") == "GenerationOptions"
    for model in (TraceOptions, GenerationOptions):
        mine = model.model_json_schema()["properties"]
        theirs = spec[model.__name__]["properties"]
        assert set(theirs) == set(model.model_fields)
        for name, prop in mine.items():
            for key in ("default", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "description"):
                assert theirs[name].get(key) == prop.get(key), (model.__name__, name, key)


def test_the_document_window_is_defined_once():
    from index import protocol as P
    from index.engine import Federation
    from index.remote import RemoteSource
    from index.source import SourceIndex

    for name in DocumentWindow.model_fields:  # TraceOptions embeds the window, with its limits
        mine, window = TraceOptions.model_fields[name], DocumentWindow.model_fields[name]
        assert (mine.default, mine.metadata, mine.description) == (window.default, window.metadata, window.description)
        assert getattr(TraceOptions(), name) == getattr(WINDOW, name)
    # the protocol accepts exactly what a trace may ask for
    wire = {"max_docs": P.SpanRequest.model_fields["n"], "context_tokens": P.DocumentsRequest.model_fields["context_tokens"],
            "snippet_tokens": P.DocumentsRequest.model_fields["snippet_tokens"]}
    for name, field in wire.items():
        assert field.default == getattr(WINDOW, name) and field.metadata == DocumentWindow.model_fields[name].metadata
    assert P.MAX_DOCS == _bounds(DocumentWindow, "max_docs")["le"]
    # and the engines' defaults are the window's
    for fn, n in ((Federation.documents, "n"), (Federation.documents_many, "n"), (SourceIndex.documents, "n"),
                  (RemoteSource.documents, "n"), (RemoteSource.documents_many, None)):
        sig = inspect.signature(fn).parameters
        assert sig["context_tokens"].default == WINDOW.context_tokens and sig["snippet_tokens"].default == WINDOW.snippet_tokens
        assert n is None or sig[n].default == WINDOW.max_docs


def test_the_library_takes_the_option_models():
    from flexolmo.model.generate import generate
    from tracing.trace import Tracer

    opened = inspect.signature(Tracer.open).parameters
    assert "options" in opened and not {"exclude", "include"} & set(opened)  # experts off are options fields
    for fn in (Tracer.trace, Tracer.trace_ids, Tracer.generate_and_trace):
        assert "options" in inspect.signature(fn).parameters
    assert "options" in inspect.signature(generate).parameters


def test_device_and_dtype_defaults_are_defined_once():
    from flexolmo.evaluation.run import run_eval
    from flexolmo.model.config import TrainConfig
    from flexolmo.model.loading import ModelSpec
    from flexolmo.model.router_tuning import tune_router

    commands = {name: _params(name) for name in ("trace", "generate", "eval", "tune-router", "serve")}
    train = typer.main.get_command(cli).commands["train"].commands
    commands.update({f"train {n}": {p.name: p for p in train[n].params} for n in ("public", "expert")})
    for name, params in commands.items():
        want = (None, None) if name == "serve" else (DEVICE, DTYPE)  # serve: unset, $FLEXOLMO_DEVICE stands
        assert (params["device"].default, params["dtype"].default) == want, name
    assert (ModelSpec().device, ModelSpec().dtype) == (DEVICE, DTYPE)
    assert (TrainConfig.device, TrainConfig.dtype) == (DEVICE, DTYPE)
    for fn in (run_eval, tune_router):
        sig = inspect.signature(fn).parameters
        assert (sig["device"].default, sig["dtype"].default) == (DEVICE, DTYPE)


def test_serve_keeps_the_environments_device_and_dtype(tmp_path, monkeypatch):
    """`flexolmo serve` without --device/--dtype leaves FLEXOLMO_DEVICE/FLEXOLMO_DTYPE to the
    service (which checks them); with them, the options win."""
    monkeypatch.setenv("FLEXOLMO_KEYS", str(tmp_path / "keys.json"))  # no keys: 0.0.0.0 is refused after the checks
    run = lambda *a: CliRunner().invoke(cli, ["--workspace", str(tmp_path / "ws"), "serve", "--host", "0.0.0.0", *a])  # noqa: E731

    monkeypatch.setenv("FLEXOLMO_DEVICE", "tpu")
    r = run()
    assert r.exit_code == 1 and "'tpu' is not a device" in r.output, r.output  # checked, not replaced by cpu
    monkeypatch.setenv("FLEXOLMO_DEVICE", "auto")
    monkeypatch.setenv("FLEXOLMO_DTYPE", "bfloat16")
    r = run()
    assert r.exit_code == 1 and "refusing to serve on 0.0.0.0" in r.output, r.output
    assert (os.environ["FLEXOLMO_DEVICE"], os.environ["FLEXOLMO_DTYPE"]) == ("auto", "bfloat16")
    r = run("--device", "cpu", "--dtype", "float32")
    assert "refusing to serve" in r.output
    assert (os.environ["FLEXOLMO_DEVICE"], os.environ["FLEXOLMO_DTYPE"]) == ("cpu", "float32")
    assert not Path(tmp_path / "keys.json").exists()


def test_a_search_shows_as_many_documents_by_default_everywhere():
    """`flexolmo search --docs`, the API's `n_docs` and the library's `n_docs`: one default, one limit."""
    from api.schemas import SearchRequest
    from cli import search as cli_search
    from index import query

    field = SearchRequest.model_fields["n_docs"]
    cli_default = inspect.signature(cli_search.search).parameters["docs"].default
    assert field.default == cli_default == inspect.signature(query.search).parameters["n_docs"].default == \
        query.DOCS_PER_SOURCE
    assert [m.le for m in field.metadata if hasattr(m, "le")] == [query.MAX_DOCS]
    r = CliRunner().invoke(cli, ["search", "x", "--docs", str(query.MAX_DOCS + 1)])
    assert r.exit_code == 2 and "--docs" in r.output
