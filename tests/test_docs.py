"""The documentation stays true: its runnable blocks run, its links resolve, the spec reference
(docs/specs.md) matches the parser, and the console commands are installed.

A code block runs here when the line before its fence is `<!-- test: run -->`: a ```python block as
a script in an empty folder; a ```console block line by line, each `$ COMMAND` from the repository's
root (`python` being this interpreter), its output exactly the lines below it.
"""

import importlib
import importlib.metadata
import os
import pkgutil
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from study.config import ALL_KEYS
from sweeps.spec import ALGORITHMS, DISTRIBUTIONS, SCHEDULERS, SIZES, SpecError, load_spec, parse_spec

from .conftest import ROOT

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MARK = "<!-- test: run -->"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.S | re.M)


def spec_constant(name: str):
    """A constant of the spec parser, from `sweeps.spec` or, where it is a package, the module of
    it that defines the constant (the keys each part of a spec accepts are private to the parser)."""
    package = importlib.import_module("sweeps.spec")
    if hasattr(package, name):
        return getattr(package, name)
    for module in pkgutil.walk_packages(getattr(package, "__path__", []), "sweeps.spec."):
        found = getattr(importlib.import_module(module.name), name, None)
        if found is not None:
            return found
    raise AssertionError(f"the spec parser defines no {name}")


def blocks(path: Path) -> list[tuple[str, str, int, bool]]:
    """(language, code, line, marked to run) of every fenced block of a Markdown file."""
    text = path.read_text()
    return [(m.group(1), m.group(2), text.count("\n", 0, m.start()) + 1,
             text[:m.start()].rstrip("\n").endswith(MARK)) for m in FENCE.finditer(text)]


def runnable(language: str) -> list:
    return [pytest.param(code, id=f"{path.relative_to(ROOT)}:{line}")
            for path in DOCS for lang, code, line, marked in blocks(path)
            if marked and lang == language]


def unfenced(text: str) -> str:
    """The Markdown with its fenced blocks blanked (line numbers kept)."""
    return FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)


def prose(text: str) -> str:
    """The Markdown without its fenced blocks and inline code spans, where nothing is a link."""
    return re.sub(r"`[^`\n]*`", "``", unfenced(text))


def test_the_runnable_blocks_are_marked():
    """Each kind of runnable example is still marked, so that the tests below run it."""
    marked = {(path.name, lang, code.split("\n")[0]) for path in DOCS
              for lang, code, _, run in blocks(path) if run}
    assert any(name == "activation.md" and lang == "python" for name, lang, _ in marked)
    assert any(first.startswith("$ python -m sweeps check") for *_, first in marked)
    assert any(first.startswith("$ python -m analysis summary") for *_, first in marked)
    for path in DOCS:  # a mark (a line of its own) stands right before a fence, or it runs nothing
        text = path.read_text()
        for m in re.finditer(f"^{re.escape(MARK)}$", text, re.M):
            assert re.match(r"\n```(python|console)\n", text[m.end():]), \
                f"{path.name}: {MARK} not followed by a python or console block"


@pytest.mark.parametrize("code", runnable("python"))
def test_python_blocks_run(code, tmp_path):
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize("code", runnable("console"))
def test_console_blocks_run_and_print_what_they_show(code):
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "STORAGE")}
    steps = re.split(r"^\$ ", code, flags=re.M)
    assert steps[0] == "", "a console block starts with `$ COMMAND`"
    for step in steps[1:]:
        command, *shown = step.rstrip("\n").split("\n")
        argv = shlex.split(command)
        if argv[0] == "python":
            argv[0] = sys.executable
        elif argv[0].startswith("study-"):
            argv[0] = str(Path(sys.executable).parent / argv[0])
        else:
            pytest.fail(f"{command}: a runnable console block runs python or the project's commands")
        proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"{command}: {proc.stderr[-3000:]}"
        assert [line.rstrip() for line in proc.stdout.rstrip("\n").split("\n")] == \
            [line.rstrip() for line in shown], f"{command} prints other lines than the docs show"


def test_the_example_specs_are_valid_at_every_size(tmp_path):
    found = 0
    for path in DOCS:
        for lang, code, line, _ in blocks(path):
            raw = yaml.safe_load(code) if lang == "yaml" else None
            if not (isinstance(raw, dict) and "name" in raw):
                continue  # a fragment (space entries), not a whole spec
            found += 1
            spec = tmp_path / f"{path.stem}-{line}.yaml"
            spec.write_text(code)
            for size in ("", *(name for name in SIZES if name in raw)):
                load_spec(spec, size=size)  # raises SpecError, naming the field
    assert found >= 3  # sweeps.md's, and specs.md's two


# --- docs/specs.md against the parser ---------------------------------------------------------

SPECS = ROOT / "docs" / "specs.md"
BASE = {"name": "doc-test", "fixed": {"data.name": "synthetic", "budget.epochs": 2},
        "space": {"activation.p": {"uniform": [0.0, 1.0]}}}


def documented() -> dict[str, set[str]]:
    """Heading -> the names in the first column of the tables of its section (up to the next
    heading of any level) in docs/specs.md."""
    found: dict[str, set[str]] = {}
    heading = None
    for line in unfenced(SPECS.read_text()).splitlines():
        if match := re.match(r"#+ (.*)", line):
            heading = match.group(1)
            found[heading] = set()
        elif line.startswith("|") and not re.match(r"\|[-| ]+\|$", line) and heading is not None:
            found[heading].add(line)
    keys = {}
    for heading, rows in found.items():
        first = [row.split("|")[1] for row in rows]
        header = {cell for cell in first if "`" not in cell}  # the header row
        keys[heading] = {name for cell in first if cell not in header
                         for name in re.findall(r"`([^`]+)`", cell)}
    return keys


def accepted() -> dict[str, set[str]]:
    """Heading of docs/specs.md -> what the parser accepts there."""
    sections = spec_constant("_SECTION_KEYS")
    return {
        "Top-level keys": set(spec_constant("_TOP_KEYS")),
        "`search`": set(sections["search"]),
        "`scheduler`": set(sections["scheduler"]),
        "`resources`": set(sections["resources"]),
        "Search algorithms": set(ALGORITHMS),
        "Schedulers": set(SCHEDULERS),
        "Space entries": {*DISTRIBUTIONS, "when"},
        "Sizes: `smoke` and `quick`": set(spec_constant("_SIZE_KEYS")),
        "Trial settings": set(ALL_KEYS),
    }


def test_the_spec_reference_documents_every_key_the_parser_accepts_and_no_other():
    keys = documented()
    for heading, expected in accepted().items():
        assert heading in keys, f"docs/specs.md has no section {heading!r}"
        assert keys[heading] - expected == set(), f"{heading}: documented, but refused by the parser"
        assert expected - keys[heading] == set(), f"{heading}: accepted, but not documented"
    assert set(SIZES) <= keys["Top-level keys"]


def refusal(raw: dict) -> str:
    try:
        parse_spec(raw, "docs/specs.md")
    except SpecError as err:
        return str(err)
    return ""


def test_the_parser_itself_accepts_each_documented_key():
    """Asked directly, not through its constants: every documented key is one the parser knows
    (it may still refuse the placeholder value), and a key it does not know is refused as such."""
    keys = documented()
    assert refusal(BASE) == ""
    assert "nonsense: unknown key" in refusal({**BASE, "nonsense": 1})
    for key in keys["Top-level keys"]:
        assert f"{key}: unknown key" not in refusal({**BASE, key: None})
    for section in ("search", "scheduler", "resources", "smoke", "quick"):
        assert f"{section}.nonsense: unknown key" in refusal({**BASE, section: {"nonsense": 1}})
        table = f"`{section}`" if section not in SIZES else "Sizes: `smoke` and `quick`"
        for key in keys[table]:
            assert f"{section}.{key}: unknown key" not in refusal({**BASE, section: {key: None}})
    space = "space.activation.p"
    assert "unknown distribution" in refusal({**BASE, "space": {"activation.p": {"normal": [0, 1]}}})
    for kind in keys["Space entries"]:
        entry = {kind: [0.0, 1.0]} if kind != "when" else {"uniform": [0.0, 1.0], "when": {}}
        problem = refusal({**BASE, "space": {"activation.p": entry}})
        assert f"{space}.{kind}: unknown distribution" not in problem
    for algorithm in keys["Search algorithms"]:
        problem = refusal({**BASE, "search": {"algorithm": algorithm}})
        assert "search.algorithm: expected one of" not in problem
    for name in keys["Schedulers"]:
        assert "scheduler.name: expected one of" not in refusal({**BASE, "scheduler": {"name": name}})
    assert "space.model.nonsense: unknown trial key" in refusal(
        {**BASE, "space": {"model.nonsense": {"choice": [1]}}})
    for key in keys["Trial settings"] - {"seed"}:  # (the seed is refused in a space: `seeds`)
        problem = refusal({**BASE, "space": {key: {"choice": [1]}}})
        assert f"space.{key}: unknown trial key" not in problem


# --- links ------------------------------------------------------------------------------------


def slugs(path: Path) -> set[str]:
    """The anchors GitHub gives a Markdown file's headings (a repeated one gets -1, -2, ...)."""
    found, seen = set(), {}
    for line in unfenced(path.read_text()).splitlines():
        if match := re.match(r"#{1,6} (.*)", line):
            text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", match.group(1)).replace("`", "")
            slug = re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")
            found.add(f"{slug}-{seen[slug]}" if slug in seen else slug)
            seen[slug] = seen.get(slug, 0) + 1
    return found


def test_every_relative_link_resolves():
    broken = []
    for path in DOCS:
        for target in re.findall(r"\]\(([^)\s]+)\)", prose(path.read_text())):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):
                continue  # https:, mailto:
            file, _, anchor = target.partition("#")
            resolved = (path.parent / file).resolve() if file else path
            if not resolved.exists():
                broken.append(f"{path.name}: {target} (no such file)")
            elif anchor and resolved.suffix == ".md" and anchor not in slugs(resolved):
                broken.append(f"{path.name}: {target} (no such heading)")
    assert not broken, broken


# --- console commands -------------------------------------------------------------------------


def test_the_console_commands_are_installed():
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert set(declared) == {"study-sweeps", "study-analysis"}
    dist = importlib.metadata.distribution("sigmoid-or-binary-study")
    installed = {e.name: e for e in dist.entry_points if e.group == "console_scripts"}
    assert {name: e.value for name, e in installed.items()} == declared, \
        "the installed entry points are stale: .venv/bin/pip install --no-deps -e . (make setup does)"
    from analysis.__main__ import main as analysis_main
    from sweeps.__main__ import main as sweeps_main

    assert installed["study-sweeps"].load() is sweeps_main
    assert installed["study-analysis"].load() is analysis_main
    bin_dir = Path(sys.executable).parent
    proc = subprocess.run([bin_dir / "study-sweeps", "check", "sweeps/specs/quick.yaml"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert (proc.returncode, proc.stdout) == (0, "sweeps/specs/quick.yaml: ok (12 trials, tpe)\n")
    proc = subprocess.run([bin_dir / "study-analysis", "summary", "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "--experiment" in proc.stdout
    proc = subprocess.run([bin_dir / "study-sweeps", "check", "no-such-spec.yaml"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ")  # the exit status goes through
