"""The documentation a reader follows from the code must exist.

Code comments and docstrings cite the contract as ``SPEC §<id>``. This test fails when such a
citation names a section that ``docs/SPEC.md`` does not have, or when the README stops linking the
contract and the benchmarking protocol, so that the references cannot silently rot.

How a section is recognised: a Markdown heading line of ``docs/SPEC.md`` (one to six ``#``)
whose text starts with ``§<id>``, e.g. ``## §1. Logit KD`` (id ``1``), ``### §1b. ...`` (id
``1b``) or ``## §Common rules`` (id ``Common``).

How an id is read: ``§`` followed by digits with an optional lower-case letter (``1``, ``1b``,
``12c``) or by a capitalised word (``Errors``, ``Common``). The id ends at the first character
that does not fit, so ``§1.``, ``§1's``, ``§3)`` and ``§Common rules`` cite ``1``, ``1``, ``3`` and
``Common``.

How a citation is found: the word ``SPEC`` followed by ``§<id>``, with only whitespace or
comment markers (``#``, ``//``, ``*``) between them (a citation may wrap onto the next comment
line), plus every further ``§<id>`` chained to it by ``,``, ``/``, ``and`` or ``or``: ``SPEC §1,
§1c`` cites ``1`` and ``1c``. A bare ``§6`` without ``SPEC`` (e.g. a section of a cited paper) is
not a citation.
"""
from __future__ import annotations

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SPEC = ROOT / "docs" / "SPEC.md"
BENCHMARKING = ROOT / "docs" / "BENCHMARKING.md"
README = ROOT / "README.md"

#: Where citations are looked for: the code, the tests, the scripts, the top-level README and the
#: docs themselves (a cross-reference between sections must resolve too).
SCANNED = ("fastkd", "csrc", "tests", "benchmarks", "examples", "scripts", "docs", "README.md")
TEXT_SUFFIXES = {".py", ".pyi", ".c", ".cc", ".cpp", ".cu", ".cuh", ".h", ".hpp", ".md", ".rst",
                 ".txt", ".sh", ".toml", ".cfg", ".ini", ".yaml", ".yml"}

_ID = r"(?:\d+[a-z]?|[A-Z][A-Za-z]*)"
_HEADING = re.compile(r"^#{1,6}[ \t]+§(" + _ID + r")(?![A-Za-z0-9])", re.MULTILINE)
# SPEC, then comment/whitespace filler (a wrapped docstring or // comment), then the first id;
# then any ids chained to it.
_CITATION = re.compile(r"\bSPEC(?:[ \t]|\r?\n[ \t]*(?:#|//|\*)?[ \t]*)+§(" + _ID + r")"
                       r"((?:\s*(?:,|/|\band\b|\bor\b)\s*§" + _ID + r")*)")
_CHAINED = re.compile(r"§(" + _ID + r")")


def spec_sections(text: str) -> set:
    """The section ids that ``text`` (a SPEC.md) defines as headings."""
    return set(_HEADING.findall(text))


def citations(text: str) -> list:
    """``(line number, id)`` of every ``SPEC §<id>`` citation in ``text``."""
    out = []
    for m in _CITATION.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        out.append((line, m.group(1)))
        out += [(line, extra) for extra in _CHAINED.findall(m.group(2))]
    return out


def _scanned_files():
    for name in SCANNED:
        path = ROOT / name
        if path.is_file():
            yield path
            continue
        for f in sorted(path.rglob("*")):
            if f.is_file() and f.suffix in TEXT_SUFFIXES and "__pycache__" not in f.parts:
                yield f


def test_citation_rules():
    """The rules of the module docstring, on examples (so a regex change that breaks them shows)."""
    assert spec_sections("## §1. Logit\n### §1b. Large\n## §Common rules\n## §Errors\n"
                         "text §9 not a heading\n## no id\n") == {"1", "1b", "Common", "Errors"}
    text = ('"""SPEC §1, §1c: x. See SPEC §Errors. SPEC §3). SPEC §1\'s. SPEC §1b/§2."""\n'
            "// Torch glue (SPEC\n// §2): y\n"
            "    from the flags (SPEC\n    §Errors)\n"
            "Hinton et al. 2015, §6 is a paper's section, not a citation\n")
    assert [i for _, i in citations(text)] == ["1", "1c", "Errors", "3", "1", "1b", "2", "2",
                                               "Errors"]


def test_spec_citations_resolve():
    assert SPEC.is_file(), "docs/SPEC.md is missing"
    sections = spec_sections(SPEC.read_text(encoding="utf-8"))
    assert sections, "docs/SPEC.md has no '## §<id> ...' headings"
    missing, seen = [], 0
    for f in _scanned_files():
        try:
            text = f.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        for line, ident in citations(text):
            seen += 1
            if ident not in sections:
                missing.append(f"{f.relative_to(ROOT)}:{line}: SPEC §{ident}")
    assert seen > 0, "no SPEC citation found at all: the scan itself is broken"
    assert not missing, ("these citations name a section that docs/SPEC.md does not have "
                         f"(its sections: {sorted(sections)}):\n" + "\n".join(missing))


@pytest.mark.parametrize("doc", [SPEC, BENCHMARKING], ids=lambda p: p.name)
def test_readme_links_docs(doc):
    target = doc.relative_to(ROOT).as_posix()
    assert doc.is_file(), f"{target} is missing"
    readme = README.read_text(encoding="utf-8")
    assert re.search(r"\]\(" + re.escape(target) + r"(?:#[^)]*)?\)", readme), \
        f"README.md does not link {target}"


def _anchors(path: pathlib.Path) -> set:
    """The anchors GitHub gives the headings of ``path``: lower case, punctuation dropped,
    spaces to hyphens."""
    headings = re.findall(r"^#{1,6}[ \t]+(.+?)[ \t]*$", path.read_text(encoding="utf-8"),
                          re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


def test_anchors_exist():
    """Every ``docs/X.md#anchor`` link of the README, and every ``#anchor`` link inside the docs,
    names a heading of its file."""
    bad = []
    for path, anchor in re.findall(r"\]\((docs/[^)#]+\.md)#([^)]+)\)",
                                   README.read_text(encoding="utf-8")):
        if anchor not in _anchors(ROOT / path):
            bad.append(f"README.md -> {path}#{anchor}")
    for doc in (SPEC, BENCHMARKING):
        for anchor in re.findall(r"\]\(#([^)]+)\)", doc.read_text(encoding="utf-8")):
            if anchor not in _anchors(doc):
                bad.append(f"{doc.name} -> #{anchor}")
    assert not bad, f"links to anchors that do not exist: {bad}"


def test_readme_demo_shows_every_family():
    """The README's benchmark command (scripts/bench.sh) runs the demo set of every suite, and
    every suite has a demo set on both devices."""
    from fastkd.bench import cli, core
    script = (ROOT / "scripts" / "bench.sh").read_text(encoding="utf-8")
    assert re.search(r"python -m fastkd\.bench\b.*--suite all\b.*--sizes demo\b", script), \
        "scripts/bench.sh does not run `python -m fastkd.bench --suite all --sizes demo`"
    assert "bash scripts/bench.sh" in README.read_text(encoding="utf-8")
    for name in cli.SUITE_ORDER:
        suite = core.get_suite(name)
        for device in ("cpu", "cuda"):
            configs = suite.configs(device, "demo", None, {"divergence": None})
            assert configs, f"suite {name} has no demo configs on {device}"
            quick = suite.configs(device, "quick", None, {"divergence": None})
            assert len(configs) <= len(quick), f"suite {name}: demo is larger than quick"
