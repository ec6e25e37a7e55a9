"""The README stays a short entry point, and the benchmark page shows the committed results."""

from bench.run import RESULTS_BLOCK

from .conftest import ROOT


def test_the_benchmark_page_shows_the_committed_benchmark_table():
    page = (ROOT / "docs" / "benchmarks.md").read_text()
    start = page.index(RESULTS_BLOCK[0]) + len(RESULTS_BLOCK[0])
    assert page[start:page.index(RESULTS_BLOCK[1])] == (ROOT / "bench" / "results.md").read_text(), \
        "bench/run.py writes both: run it again, or copy bench/results.md between the markers"


def test_the_readme_is_short_and_points_into_the_docs():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) < 200, "the README is an entry point: move details into docs/"
    assert RESULTS_BLOCK[0] not in readme  # the benchmark table lives in docs/benchmarks.md
    for page in sorted((ROOT / "docs").glob("*.md")):
        assert f"](docs/{page.name})" in readme, f"the README does not link docs/{page.name}"
