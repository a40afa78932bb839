"""The docs: generated reference pages are current, the site builds with --strict, the README's links land."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# The README is the front door, not a manual: what opd is, what is verified where, the two ways to run it,
# the docs' map. Everything longer goes under docs/.
README_MAX_LINES = 200


def _gen():
    spec = importlib.util.spec_from_file_location("docs_gen", ROOT / "docs" / "gen.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_generated_page_equals_a_fresh_generation():
    gen = _gen()
    assert set(gen.pages()) == {
        "reference/distillationrun.md",
        "reference/cli.md",
        "reference/metrics.md",
        "reference/helm-values.md",
    }
    assert gen.stale_pages() == [], "run `make docs` (python docs/gen.py --write) and commit the pages"


def test_a_changed_source_makes_its_page_stale(tmp_path):
    """The check compares against the code, not against itself: pages written now are current, and a
    value added to the chart afterwards makes the values page, and only it, stale."""
    gen = _gen()
    chart = tmp_path / "chart"
    chart.mkdir()
    for name in ("values.yaml", "values.schema.json"):
        (chart / name).write_text((gen.CHART / name).read_text())
    where = ["--docs", str(tmp_path / "docs"), "--chart", str(chart)]
    assert gen.main(["--write", *where]) == 0
    assert gen.stale_pages(tmp_path / "docs", chart) == []
    with open(chart / "values.yaml", "a") as f:
        f.write("\n# A value added after the page was written.\naddedValue: 3\n")
    assert gen.stale_pages(tmp_path / "docs", chart) == ["reference/helm-values.md"]
    assert gen.main(["--check", *where]) == 1
    assert "| `addedValue` |  | `3` | A value added after the page was written. |" in gen.helm_values(chart)


def test_cli_page_covers_every_subcommand():
    from opd_runtime.cli import build_parser

    gen = _gen()
    page = gen.cli()
    names = gen._subcommands(build_parser())
    assert "run" in names and "distill" in names
    for name in names:
        assert f"### opd {name}\n" in page, name
        assert f"usage: opd {name}" in page, name


def test_site_builds_strict(tmp_path):
    """mkdocs --strict fails on a link to a missing page or anchor, a page left out of the nav, or a nav
    entry without its page."""
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONSAFEPATH": "1", "NO_MKDOCS_2_WARNING": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (tmp_path / "site" / "reference" / "distillationrun" / "index.html").exists()


def test_readme_is_a_front_door_whose_links_land():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= README_MAX_LINES
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", readme)
    local = [t for t in targets if "://" not in t]
    assert any(t.startswith("docs/") for t in local)
    missing = [t for t in local if not (ROOT / t).exists()]
    assert missing == []
