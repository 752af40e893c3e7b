"""Every ```python block in README.md and docs/ runs, unless the line before it is
``<!-- not-run: REASON -->``. Blocks of one page run in order in one namespace, in a temp dir."""

import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
BLOCK = re.compile(r"(?P<before>[^\n]*)\n```python\n(?P<code>.*?)\n```", re.S)


def blocks(page: Path) -> list[str]:
    out = []
    for m in BLOCK.finditer("\n" + page.read_text()):
        if "not-run:" in m.group("before"):
            continue
        out.append(m.group("code"))
    return out


@pytest.mark.parametrize("page", [p for p in PAGES if blocks(p)], ids=lambda p: str(p.relative_to(ROOT)))
def test_docs_code_blocks_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PYTHONHASHSEED", "0")
    namespace: dict = {"__name__": "__docs__"}
    for i, code in enumerate(blocks(page)):
        try:
            exec(compile(code, f"{page.name}[block {i}]", "exec"), namespace)
        except Exception as exc:  # pragma: no cover - the message is the point
            raise AssertionError(f"{page.relative_to(ROOT)} block {i} failed: {exc!r}\n{code}") from exc
    assert os.getcwd() == str(tmp_path)
