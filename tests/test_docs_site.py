"""The docs site as a reader meets it: built with the project's mkdocs.yml, every link between
pages lands on a page file (so the site works opened from disk), the content uses the window's
width, and getting-started leads on to the policy guide."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    pytest.importorskip("mkdocs")
    pytest.importorskip("material")
    pytest.importorskip("mkdocstrings")
    out = tmp_path_factory.mktemp("site")
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-f", str(ROOT / "mkdocs.yml"), "-d", str(out)],
        capture_output=True, text=True, timeout=600, cwd=ROOT, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT),
                                                                   "NO_MKDOCS_2_WARNING": "1"},
    )
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.mark.slow
def test_every_local_link_lands_on_a_file_when_opened_from_disk(site):
    pages = sorted(p for p in site.rglob("*.html") if p.name != "404.html")  # 404: only for web servers
    assert len(pages) > 10
    for page in pages:
        for href in re.findall(r'href="([^"]+)"', page.read_text()):
            parts = urlsplit(href)
            if parts.scheme or parts.netloc or not parts.path:
                continue  # external, or an anchor on this page
            target = (page.parent / parts.path).resolve()
            assert target.is_file(), f"{page.relative_to(site)} links to {href!r}, which is not a file"


@pytest.mark.slow
def test_the_content_uses_the_window_width(site):
    index = (site / "index.html").read_text()
    assert "stylesheets/extra.css" in index
    assert re.search(r"\.md-grid\s*{\s*max-width:\s*min\(100%", (site / "stylesheets" / "extra.css").read_text())
    assert 'data-md-component="toc"' not in index or "toc.integrate" in (ROOT / "mkdocs.yml").read_text()


def test_getting_started_leads_on_to_the_policy_guide():
    text = (ROOT / "docs" / "getting-started.md").read_text()
    nxt = text.split("## Next", 1)[1]
    assert "(guide/writing-a-policy.md)" in nxt and "(concepts/policies.md)" in nxt
