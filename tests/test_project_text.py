"""The project's text speaks to its users: no tracker numbers or words about how machines were
obtained, and the README and the distributed guide say exactly what has run on GPUs."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEXT_FILES = [
    p for folder in ("eplb", "tests", "docs", "benchmarks", "examples") for p in (ROOT / folder).rglob("*")
    if p.suffix in {".py", ".md", ".sh", ".yml", ".toml", ".css"} and p.is_file() and p.name != "test_project_text.py"
] + [ROOT / "README.md", ROOT / "run.sh", ROOT / "pyproject.toml", ROOT / "mkdocs.yml"]
# Built from parts so this file does not match itself.
FORBIDDEN = re.compile(
    "|".join([r"\bissue\s*#?\d+", r"\(issue\b", r"async " + "issue", r"\blent\b", r"\blending\b",
              "nvidia-" + r"h200", "device " + "kinds?"]),
    re.IGNORECASE,
)


def test_no_tracker_numbers_or_machine_lending_words():
    hits = [
        f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
        for path in TEXT_FILES
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1)
        if FORBIDDEN.search(line)
    ]
    assert not hits, "\n".join(hits)


def test_readme_and_distributed_guide_say_what_has_run_on_gpus():
    for page in (ROOT / "README.md", ROOT / "docs" / "guide" / "distributed.md"):
        text = page.read_text()
        section = text.split("## What has run on GPUs", 1)[1]
        assert "1 H200 GPU" in section
        assert "2 H200 GPUs" in section
        assert "Not run yet: 4 GPUs" in section or "4 GPUs or several hosts**: not run yet" in section
        assert "gloo between CPU processes" in section


def test_design_and_fault_guide_state_the_exit_join_cap():
    from eplb.executor.async_executor import EXIT_JOIN_CAP_S

    cap = f"at most {EXIT_JOIN_CAP_S:g} s"
    for page in (ROOT / "docs" / "design.md", ROOT / "docs" / "guide" / "faults.md"):
        text = " ".join(page.read_text().split())
        assert f"`async_timeout_s` + 1 s, {cap}" in text, page.name
