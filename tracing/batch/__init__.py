"""Provenance across a corpus of outputs: trace a file of responses, report on the whole batch.

    from tracing.batch import BatchSpec, run_batch, batch_report
    res = run_batch(ws, "answers.jsonl", BatchSpec.parse(options={"counterfactual": False}), workers=2)
    rep = batch_report(ws, res.batch_id)        # per-source reproduction, per-owner expert effect
    flexolmo trace-batch answers.jsonl --workers 2       # the same from the command line
    flexolmo trace-batch answers.jsonl --ray             # on Ray Data (a local cluster, or --ray ADDRESS)
    flexolmo trace-batch bench.jsonl --contamination --question-field q --answer-field a
    flexolmo report batch BATCH_ID --plot longest.png

Modules:
    spec.py           what defines a batch (mode, trace options, model, limits) and its id
    inputs.py         reading JSONL or Parquet input into rows, bad rows marked with their reason
    tracer.py         `BatchTracer`: the stateful callable that traces a batch of rows (the local
                      pool's workers and Ray Data's `map_batches` actors both hold one)
    contamination.py  the longest verbatim match of a benchmark item per source
    tables.py         the result tables (one row per response; spans, documents, experts)
    layout.py         a batch's folder: committed units, the done-set, progress, final Parquet
    run.py            the engines (in-process, a local process pool, Ray) and the resumable commit
    ray_engine.py     the Ray Data pipeline (imported only when asked for)
    progress.py       rate and ETA: a bar on a terminal, a log line every few seconds otherwise
    report.py         the corpus reports and the longest-match plot
"""

from .report import BatchReport, batch_report, export_flagged
from .run import BatchResult, run_batch
from .spec import BatchSpec

__all__ = ["BatchReport", "BatchResult", "BatchSpec", "batch_report", "export_flagged", "run_batch"]
