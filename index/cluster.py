"""Owner nodes as local processes: for the federated demo, the benchmark and the tests.

    keys = issue_keys(ws, keys_file, owners)                  # owner -> key (scope index)
    nodes = start_nodes(ws, ["news", "code"], keys_file, log_dir)
    nodes["news"].url                                          # http://127.0.0.1:<port>
    nodes["news"].kill()                                       # as if its host went down
    stop_nodes(nodes)

Each node is `flexolmo index serve` in its own process on 127.0.0.1 (a free port unless
given), serving one source of `ws`, exactly as an owner runs it on its own machine; it
never writes to `ws` (keys come from `keys_file`, which may live elsewhere).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from flexolmo.base.errors import ConflictError
from flexolmo.base.workspace import Workspace

from .keys import KeyStore

READY = re.compile(r"listening on (http://127\.0\.0\.1:\d+)")
START_TIMEOUT_S = 120.0  # imports and index opening on a loaded 2-core machine


@dataclass
class NodeProcess:
    source: str
    proc: subprocess.Popen
    log: Path
    url: str = ""

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def kill(self) -> None:
        """SIGKILL: the node vanishes mid-answer, as a host that goes down."""
        if self.alive:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self, timeout: float = 10.0) -> None:
        if self.alive:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()


def issue_keys(ws: Workspace, keys_file: Path, owners: Iterable[str]) -> dict[str, str]:
    """One fresh key of scope `index` per owner, in `keys_file`."""
    store = KeyStore.for_workspace(ws, keys_file)
    return {o: store.create(o, "index", label="local cluster")[1] for o in dict.fromkeys(owners)}


def spawn_node(ws: Workspace, source: str, keys_file: Path, log_dir: Path, port: int = 0,
               nice: int = 0) -> NodeProcess:
    """Start `flexolmo index serve` for `source` on 127.0.0.1 (not yet ready: see `wait_ready`)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / f"node-{source}.log"
    cmd = [sys.executable, "-m", "cli.main", "-w", str(ws.root), "index", "serve", "--source", source,
           "--host", "127.0.0.1", "--port", str(port), "--keys", str(keys_file)]
    if nice:
        cmd = ["nice", "-n", str(nice)] + cmd
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1", "RAYON_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                start_new_session=True)
    return NodeProcess(source, proc, log)


def wait_ready(nodes: Sequence[NodeProcess], timeout: float = START_TIMEOUT_S) -> None:
    """Wait until every node prints its URL; a node that exits first raises with its log's end."""
    deadline = time.monotonic() + timeout
    waiting = [n for n in nodes if not n.url]
    while waiting:
        for n in list(waiting):
            m = READY.search(n.log.read_text(errors="replace"))
            if m:
                n.url = m.group(1)
                waiting.remove(n)
            elif not n.alive:
                tail = n.log.read_text(errors="replace")[-600:]
                raise ConflictError(f"the node of {n.source!r} exited at start (code {n.proc.returncode}): {tail}")
        if waiting and time.monotonic() > deadline:
            for n in waiting:
                n.stop()
            raise ConflictError(f"nodes not ready within {timeout:.0f}s: {', '.join(n.source for n in waiting)}")
        if waiting:
            time.sleep(0.1)


def start_nodes(ws: Workspace, sources: Sequence[str], keys_file: Path, log_dir: Path,
                nice: int = 0) -> dict[str, NodeProcess]:
    """One node process per source, started together; returns when all are ready."""
    nodes = {s: spawn_node(ws, s, keys_file, log_dir, nice=nice) for s in sources}
    try:
        wait_ready(list(nodes.values()))
    except BaseException:
        stop_nodes(nodes)
        raise
    return nodes


def restart_node(ws: Workspace, node: NodeProcess, keys_file: Path, nice: int = 0) -> NodeProcess:
    """Start a stopped node again on the same port (a host that comes back)."""
    node.stop()
    new = spawn_node(ws, node.source, keys_file, node.log.parent, port=node.port, nice=nice)
    wait_ready([new])
    return new


def stop_nodes(nodes: dict[str, NodeProcess]) -> None:
    for n in nodes.values():
        n.stop()


def federate_workspace(owners: Workspace, tracer: Workspace, names: Sequence[str] | None = None,
                       base_port: int = 8701) -> dict[str, NodeProcess]:
    """The demo's federation on one machine: a node process per source of `owners` (which is only
    read), and `tracer` set up to use them (the shared tokenizer, every source added as remote).

    Ports are `base_port + i` in name order and keys are kept in `<tracer>/federation/`, so a
    second run reuses the registration. (Real owners each run `index serve` on their machine.)
    """
    from flexolmo.base import sources as src_lib
    from flexolmo.base import tokenizer as tok_lib

    from . import catalog, format as fmt
    from .keys import write_secret
    from .remote import add_remote

    srcs = {s.name: s for s in src_lib.available_sources(owners)}
    names = sorted(names or [n for n in srcs if fmt.index_dir(owners, n).exists()])
    missing = [n for n in names if n not in srcs or not fmt.index_dir(owners, n).exists()]
    if missing or not names:
        raise ConflictError(f"no index to serve for {', '.join(missing) or 'any source'} in {owners.root}; "
                            "build them there with `flexolmo index build --all`")
    home = tracer.root / "federation"
    keys_file = home / "keys.json"
    registered = catalog.list_remote_sources(tracer)
    urls = {n: f"http://127.0.0.1:{base_port + i}" for i, n in enumerate(names)}
    for n in names:
        if n in registered and registered[n]["url"] != urls[n]:
            raise ConflictError(f"{tracer.root} has {n!r} at {registered[n]['url']}, not {urls[n]}; "
                                "use the --base-port of the first run or a fresh tracer workspace")
    if not (tracer.tokenizer_dir / "tokenizer.json").exists():
        from flexolmo.base.tokenizer import import_tokenizer

        import_tokenizer(tracer, owners.tokenizer_dir)
    elif tok_lib.tokenizer_hash(tracer) != tok_lib.tokenizer_hash(owners):
        raise ConflictError(f"{tracer.root} has another tokenizer than {owners.root}; use a fresh tracer workspace")
    new = [n for n in names if n not in registered]
    keys = issue_keys(owners, keys_file, [srcs[n].owner for n in new]) if new else {}
    nodes = {n: spawn_node(owners, n, keys_file, home / "logs", port=base_port + i) for i, n in enumerate(names)}
    try:
        wait_ready(list(nodes.values()))
        for n in new:
            write_secret(home / f"{n}.key", keys[srcs[n].owner])
            s = srcs[n]
            add_remote(tracer, n, urls[n], home / f"{n}.key", owner=s.owner, domain=s.domain, licence=s.licence)
    except BaseException:
        stop_nodes(nodes)
        raise
    return nodes
