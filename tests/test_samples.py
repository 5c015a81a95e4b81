"""The sample federation's builders: splitting at natural boundaries, missing packages named."""

from __future__ import annotations

import pytest

from flexolmo import samples, sources
from flexolmo.errors import NotFoundError


def test_pack_respects_limit_and_keeps_text():
    pieces = [f"para {i} " + "word " * (i * 7) + "\n\n" for i in range(60)]
    chunks = samples.pack(pieces, max_chars=500)
    assert all(len(c) <= 500 + samples.MIN_CHARS for c in chunks)
    assert "".join(chunks).replace("\n", "").replace(" ", "") == "".join(pieces).replace("\n", "").replace(" ", "")


def test_split_before_scenes():
    play = "# Play\n\n## ACT I\n\n### SCENE I. A room.\n\nA line.\n\n### SCENE II. A hall.\n\nB line.\n"
    parts = samples.split_before(play, r"^##+ ")
    assert [p.splitlines()[0] for p in parts] == ["# Play", "## ACT I", "### SCENE I. A room.", "### SCENE II. A hall."]


def test_tex_title_ignores_comments_and_markup():
    tex = "% \\title{not this}\n\\title{Fitting \\pkg{lme4} Models {in} R}\n\\begin{document}"
    assert samples._tex_title(tex) == "Fitting lme4 Models in R"


def test_missing_package_names_the_command(monkeypatch, ws):
    with pytest.raises(NotFoundError, match=r"pip install --no-deps no-such-pkg==1"):
        samples._package_dir("no_such_module_xyz", "no-such-pkg==1")
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
