"""The README shows what the project measured: its benchmark table is bench/results.md."""

from bench.run import README_BLOCK

from .conftest import ROOT


def test_the_readme_shows_the_committed_benchmark_table():
    readme = (ROOT / "README.md").read_text()
    start = readme.index(README_BLOCK[0]) + len(README_BLOCK[0])
    assert readme[start:readme.index(README_BLOCK[1])] == (ROOT / "bench" / "results.md").read_text(), \
        "bench/run.py writes both; bench.run.with_results splices the table into the README"
