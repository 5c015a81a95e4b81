"""The provenance store on disk: append-only Parquet parts, a manifest, and one writer lock.

    traces/manifest.json                 the committed parts and the redactions they all satisfy
    traces/parts/<part>/<table>.parquet  one folder per commit (a trace, or a compaction)
    traces/tmp/                          parts being written (never read; a sweep removes them)
    traces/.lock                         writers' lock (flock): held for milliseconds per commit

Why parts and not one DuckDB file: DuckDB lets one process write a file only while no other
process has it open, so an analyst's notebook or `flexolmo query` holding the file made
traces fail. Here readers never lock anything: they read the manifest (replaced atomically),
hold its files open (`pinned`) and query them through an in-memory DuckDB (`reader`).
Writers never wait for readers.

Invariants, kept under the writer lock:
- a part is visible only once it is in the manifest (a crashed writer leaves an orphan
  folder, removed by the next compaction or `flexolmo traces repair`);
- every committed part satisfies every redaction listed in `applied`: a new part is
  redacted against `applied` before it is committed, and a redaction is added to `applied`
  only after every committed part has been rewritten (each file by `os.replace`);
- compaction writes the merged part and swaps the manifest; the merged-away folders stay
  for RETIRED_GRACE_S (a redaction removes them at once). A merge written outside the lock
  (`compact_apart`) is swapped only if no redaction was applied while it was written.

Readers and replaced files. `os.replace` alone does not give a DuckDB reader the old or the
new file whole: DuckDB opens a Parquet file several times in one query (the footer through
one open, the column chunks through another), so a file replaced between two of those opens
tore the read ("TProtocolException: Invalid data"), and a removed one failed it. A reader
therefore reads the files it pinned when it opened (`pinned`): whatever writers replace or
remove afterwards, an open reader keeps reading its snapshot, whole, until it is closed;
every reader opened after a redaction reads the redacted files.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import shutil
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from flexolmo.base.errors import ConflictError
from flexolmo.base.workspace import Workspace

WRITE_WAIT_S = 30.0  # a writer waits this long for another writer (commits take milliseconds)
COMPACT_AT = 48  # merge the small parts when there are more than this many
SMALL_PART = 2000  # traces: a part with fewer is "small" and will be merged
RETIRED_GRACE_S = 600  # merged-away parts stay this long (readers pin what they read, see `pinned`)
FD_DIR = Path("/proc/self/fd")  # Linux: opening FD_DIR/N opens the very file that fd N holds

log = logging.getLogger("flexolmo.store")
_THREAD_LOCK = threading.RLock()  # flock excludes other processes; this, other threads


@dataclass
class Manifest:
    parts: list[dict] = field(default_factory=list)  # {"id": ..., "n": traces in the part}
    applied: list[list] = field(default_factory=list)  # redaction keys every part satisfies
    retired: list[dict] = field(default_factory=list)  # {"id": ..., "at": unix time}: merged away

    @classmethod
    def read(cls, root: Path) -> "Manifest | None":
        try:
            d = json.loads((root / "manifest.json").read_text())
        except FileNotFoundError:
            return None
        return cls(parts=d["parts"], applied=d["applied"], retired=d.get("retired", []))

    def write(self, root: Path) -> None:
        tmp = root / f".manifest-{uuid.uuid4().hex[:8]}.json"
        with open(tmp, "w") as f:
            json.dump({"version": 1, "parts": self.parts, "applied": self.applied, "retired": self.retired}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, root / "manifest.json")


def root(ws: Workspace) -> Path:
    return ws.traces_path.parent


def part_files(ws: Workspace, m: Manifest, table: str) -> list[str]:
    return [str(root(ws) / "parts" / p["id"] / f"{table}.parquet") for p in m.parts]


@contextlib.contextmanager
def pinned(ws: Workspace, m: Manifest, tables: tuple[str, ...]) -> Iterator[tuple[dict[str, list[str]], str | None]]:
    """Hold every file of `m`'s parts open while the block runs.

    Yields ({table: paths to read the files by}, the folder those paths are in). Each path
    is a symlink, in a private temporary folder, to FD_DIR/N: it opens the file as it was
    when pinned, even once a redaction has replaced it or a sweep removed it (the kernel
    keeps it until the block ends), so DuckDB, opening a file several times per query,
    reads the same whole file every time. The folder is for DuckDB's sandbox, which
    resolves a path before allowing it: to the file under parts/ while it is there, else to
    the symlink in the folder (allowing FD_DIR itself would allow every descriptor of the
    process). Where there is no FD_DIR (not Linux), the files' own paths are given and no
    folder (a concurrent writer can then fail a read). FileNotFoundError: a part of `m` is
    gone (a newer manifest lists what replaced it).
    """
    files = {t: part_files(ws, m, t) for t in tables}
    if not FD_DIR.is_dir():
        yield files, None
        return
    fds: list[int] = []
    folder = None
    try:
        try:
            for t in tables:
                fds += [os.open(f, os.O_RDONLY) for f in files[t]]
        except OSError as e:
            if e.errno not in (errno.EMFILE, errno.ENFILE):
                raise
            raise ConflictError(f"reading the provenance store holds its {sum(map(len, files.values()))} files open, "
                                f"more than this process may open now ({e.strerror}); raise the limit (ulimit -n) "
                                "or close other readers") from None
        folder = tempfile.mkdtemp(prefix="flexolmo-reader-")
        it = iter(fds)
        paths: dict[str, list[str]] = {}
        for t in tables:
            paths[t] = []
            for _ in files[t]:
                fd = next(it)
                link = os.path.join(folder, f"{t}-{fd}.parquet")
                os.symlink(FD_DIR / str(fd), link)
                paths[t].append(link)
        yield paths, folder
    finally:
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
        for fd in fds:
            os.close(fd)


@contextlib.contextmanager
def writer(ws: Workspace, wait_s: float = WRITE_WAIT_S) -> Iterator[Path]:
    """Hold the writer lock (this thread and process only); yields the store's folder."""
    r = root(ws)
    r.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + wait_s
    with _THREAD_LOCK:
        with open(r / ".lock", "a+") as fh:
            while True:
                try:
                    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise ConflictError(f"another process has been writing the provenance store {r} for over "
                                            f"{wait_s:.0f} s; retry, or see `flexolmo traces repair`") from None
                    time.sleep(0.01)
            try:
                yield r
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)


def new_part_dir(ws: Workspace) -> tuple[str, Path]:
    """A fresh temporary folder for a part being written (outside the lock)."""
    return _new_tmp(root(ws))


def _new_tmp(r: Path) -> tuple[str, Path]:
    part_id = f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}"
    tmp = r / "tmp" / part_id
    tmp.mkdir(parents=True)
    return part_id, tmp


def write_tables(folder: Path, tables: dict[str, pa.Table]) -> None:
    for name, t in tables.items():
        pq.write_table(t, folder / f"{name}.parquet")


def commit(r: Path, m: Manifest, part_id: str, tmp: Path, n: int) -> None:
    """Move a written part into place and list it (caller holds the writer lock)."""
    (r / "parts").mkdir(exist_ok=True)
    os.rename(tmp, r / "parts" / part_id)
    m.parts.append({"id": part_id, "n": n})
    m.write(r)


def rewrite_table(path: Path, fn: Callable[[pa.Table], pa.Table | None]) -> bool:
    """Replace a part's table by fn(table) when fn returns a new one (atomic per file)."""
    t = fn(pq.read_table(path))
    if t is None:
        return False
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(t, tmp)
    os.replace(tmp, path)
    return True


def _tier(n: int) -> int:
    """A part's size tier: 0 under COMPACT_AT traces, 1 under COMPACT_AT**2, ..."""
    tier, limit = 0, COMPACT_AT
    while limit > 1 and n >= limit:
        tier, limit = tier + 1, limit * COMPACT_AT
    return tier


def overflowing(m: Manifest) -> list[dict]:
    """The parts of the smallest size tier (`_tier`) holding more than COMPACT_AT parts under
    SMALL_PART traces ([] if none): what the next merge reads."""
    for tier in range(_tier(SMALL_PART - 1) + 1):
        group = [p for p in m.parts if p["n"] < SMALL_PART and _tier(p["n"]) == tier]
        if len(group) > max(1, COMPACT_AT):  # (one part is merged already)
            return group
    return []


def _merge(r: Path, group: list[dict], tables: tuple[str, ...], tmp: Path) -> None:
    """Write the tables of `group`'s parts, concatenated, into the folder `tmp`."""
    for name in tables:
        # parts written before a column was added lack it: promoted to nulls
        joined = pa.concat_tables([pq.read_table(r / "parts" / p["id"] / f"{name}.parquet") for p in group],
                                  promote_options="default")
        pq.write_table(joined, tmp / f"{name}.parquet")


def _swap(r: Path, m: Manifest, group: list[dict], part_id: str, tmp: Path) -> None:
    """List the merged part in place of `group`'s, which retire (caller holds the writer lock)."""
    ids = {p["id"] for p in group}
    os.rename(tmp, r / "parts" / part_id)
    m.parts = [p for p in m.parts if p["id"] not in ids] + [{"id": part_id, "n": sum(p["n"] for p in group)}]
    m.retired += [{"id": i, "at": time.time()} for i in sorted(ids)]
    m.write(r)


def compact(r: Path, m: Manifest, tables: tuple[str, ...]) -> None:
    """Merge small parts a size tier at a time (caller holds the writer lock), and drop orphans.

    A tier (`_tier`) of parts under SMALL_PART traces is merged into one part when it holds more
    than COMPACT_AT parts, so a merge reads about COMPACT_AT parts of one size: merging every
    small part at once re-read the growing merged part at every merge (370-750 ms, every 49th
    trace stored, on the demo store). Orphans and merged-away parts past their grace are swept
    after a merge, or once due. A service merges with `compact_apart` instead."""
    merged = False
    while group := overflowing(m):
        part_id, tmp = _new_tmp(r)
        _merge(r, group, tables, tmp)
        _swap(r, m, group, part_id, tmp)
        merged = True
    if merged or any(time.time() - p["at"] >= RETIRED_GRACE_S for p in m.retired):
        sweep(r, m, grace_s=RETIRED_GRACE_S)


def compact_apart(ws: Workspace, tables: tuple[str, ...]) -> int:
    """`compact`, holding the writer lock only to choose a tier and to swap the manifest: other
    writers commit while the merged part is written (a merge of 49 small parts takes 200-300 ms
    on the demo store). The merge is dropped, not swapped, if a redaction was applied meanwhile
    (the parts it read may predate it), or its parts were merged by another process, or a sweep
    took its folder. Returns the merges swapped in."""
    done = 0
    while True:
        with writer(ws) as r:
            m = Manifest.read(r)
            group = overflowing(m) if m is not None else []
            if not group:
                return done
            applied = m.applied  # (each read makes a new manifest: this one is not written to)
            part_id, tmp = _new_tmp(r)
        try:
            _merge(r, group, tables, tmp)
        except (OSError, pa.ArrowException):  # a redaction's sweep removed what it was reading
            shutil.rmtree(tmp, ignore_errors=True)
            return done
        with writer(ws) as r:
            m = Manifest.read(r)
            listed = {p["id"] for p in m.parts}
            if (m.applied != applied or not {p["id"] for p in group} <= listed
                    or not all((tmp / f"{name}.parquet").is_file() for name in tables)):
                shutil.rmtree(tmp, ignore_errors=True)
                return done
            _swap(r, m, group, part_id, tmp)
            sweep(r, m, grace_s=RETIRED_GRACE_S)
        done += 1


_COMPACTING: set[Path] = set()  # stores a thread of this process is compacting
_COMPACTING_LOCK = threading.Lock()


def compact_soon(ws: Workspace, tables: tuple[str, ...]) -> bool:
    """Merge the store's small parts on a background thread if a merge is due (one thread per
    store in this process; `compact_apart`: writers keep committing meanwhile). A service stores
    traces with `save_trace(..., compact=False)` and calls this after, so that no answer waits
    for a merge. Returns whether a thread was started."""
    r = root(ws)
    m = Manifest.read(r)
    if m is None or not overflowing(m):
        return False
    key = r.resolve()
    with _COMPACTING_LOCK:
        if key in _COMPACTING:
            return False
        _COMPACTING.add(key)

    def run() -> None:
        try:
            compact_apart(ws, tables)
        except Exception as e:  # the next save compacts again; nothing is lost
            log.warning("compacting the provenance store %s failed: %s", r, e)
        finally:
            with _COMPACTING_LOCK:
                _COMPACTING.discard(key)

    threading.Thread(target=run, name="store-compact", daemon=True).start()
    return True


def sweep(r: Path, m: Manifest, grace_s: float = 0.0) -> list[str]:
    """Remove what no new reader can see: part folders the manifest does not list (merged-away
    parts once `grace_s` has passed, for readers that still hold them), temporary parts and
    manifests (caller holds the writer lock, and parts are only written under it, so these
    are a crashed or superseded writer's). A redaction sweeps with no grace: no copy of
    redacted text outlives it."""
    keep = {p["id"] for p in m.parts} | {p["id"] for p in m.retired if time.time() - p["at"] < grace_s}
    if len(m.retired) != len([p for p in m.retired if p["id"] in keep]):
        m.retired = [p for p in m.retired if p["id"] in keep]
        m.write(r)
    gone = [d for d in (r / "parts").glob("*") if d.name not in keep] + list((r / "tmp").glob("*"))
    for d in gone:
        shutil.rmtree(d, ignore_errors=True)
    stale = list(r.glob(".manifest-*.json")) + list((r / "parts").glob("*/*.parquet.tmp"))
    for f in stale:
        f.unlink(missing_ok=True)
    return [str(p) for p in gone + stale]
