"""The documentation builds, its code compiles, and README and CI agree."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]


def _python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_python_examples_compile(page):
    for i, block in enumerate(_python_blocks(page)):
        try:
            ast.parse(block)
        except SyntaxError as exc:  # pragma: no cover - the assertion message is the point
            pytest.fail(f"{page.name} python block {i} does not parse: {exc}")


def test_mkdocs_nav_lists_existing_pages():
    nav = re.findall(r":\s*(\S+\.md)\s*$", (ROOT / "mkdocs.yml").read_text(), flags=re.M)
    missing = [p for p in nav if not (ROOT / "docs" / p).is_file()]
    assert not missing, f"mkdocs.yml names missing pages: {missing}"


@pytest.mark.skipif(shutil.which("mkdocs") is None, reason="mkdocs not installed")
def test_docs_build_strict(tmp_path):
    pytest.importorskip("mkdocstrings")
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "index.html").is_file()


def _fenced_command(text: str, heading: str) -> str:
    section = text.split(f"**{heading}**", 1)[1]
    return re.search(r"```bash\n(.*?)\n```", section, flags=re.S).group(1).strip()


def test_ci_runs_exactly_the_readme_commands():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    install = _fenced_command(readme, "Install")
    test = _fenced_command(readme, "Test")
    assert install in ci, f"CI does not run the README install command {install!r}"
    assert test in ci, f"CI does not run the README test command {test!r}"
