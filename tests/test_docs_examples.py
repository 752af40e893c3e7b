"""Every ```python block in README.md and docs/ runs **alone**, as a reader who copies just that
block would run it: each in a fresh namespace, in a fresh temp dir, unless the line before it is
``<!-- not-run: REASON -->``."""

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


def _cases():
    for page in PAGES:
        for i, code in enumerate(blocks(page)):
            yield pytest.param(page, i, code, id=f"{page.relative_to(ROOT)}[{i}]")


@pytest.mark.parametrize(("page", "index", "code"), list(_cases()))
def test_docs_code_block_runs_alone(page, index, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PYTHONHASHSEED", "0")
    namespace: dict = {"__name__": "__docs__"}
    try:
        exec(compile(code, f"{page.name}[block {index}]", "exec"), namespace)
    except Exception as exc:  # pragma: no cover - the message is the point
        raise AssertionError(f"{page.relative_to(ROOT)} block {index} failed alone: {exc!r}\n{code}") from exc
    finally:
        _unregister_plugins(namespace)
    assert os.getcwd() == str(tmp_path)


def _unregister_plugins(namespace: dict) -> None:
    """Blocks that register a policy, adapter or communicator leave the registries as they found them
    (a reader's fresh interpreter would not carry them over to the next block either)."""
    from eplb.policies import _REGISTRY

    for name in [n for n, fn in _REGISTRY.items() if getattr(fn, "__module__", None) == "__docs__"]:
        _REGISTRY.pop(name, None)
