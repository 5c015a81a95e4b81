"""The `flexolmo` command line: a thin typer shell over flexolmo/, index/ and tracing/."""
