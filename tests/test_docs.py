"""Every Python code block of README.md and docs/*.md runs as written.

The blocks of a page run in order, in one namespace (like a notebook), in a temporary working
directory, after the page's prelude: an HTML comment at the top of the page that the reader does not
see, holding what the page assumes the reader has (their own model, data, a trained student)::

    <!-- docs-test-prelude
    from lightning_shrink.testing.models import TinyClassifier
    model = TinyClassifier()
    -->

Only blocks fenced as ```` ```python ```` run; shell sessions are fenced ```` ```bash ````, output
```` ```text ````. A failure's traceback names the page and the line of the page. A block that
looks like Python under another fence (```` ```py ````, or no language at all) is an error, so that no
Python block is silently left out.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

_PRELUDE = re.compile(r"<!--\s*docs-test-prelude\n(.*?)-->", re.S)
_BLOCK = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)
_ANY_BLOCK = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.S | re.M)


def located_blocks(text: str) -> list[tuple[int, str]]:
    """The page's prelude (if any) and its ```python blocks, each with the line of the page on which
    its code starts."""

    def line_of(offset: int) -> int:
        return text.count("\n", 0, offset) + 1

    prelude = _PRELUDE.search(text)
    blocks = [(line_of(prelude.start(1)), prelude.group(1))] if prelude else []
    return blocks + [(line_of(m.start(1)), m.group(1)) for m in _BLOCK.finditer(text)]


def python_blocks(text: str) -> list[str]:
    """The page's prelude (if any) followed by its ```python blocks."""
    return [code for _, code in located_blocks(text)]


def misfenced_python(text: str) -> list[int]:
    """Lines of blocks that look like Python (they parse and import or define something) but are not
    fenced ```python, so they would not run."""
    lines = []
    for m in _ANY_BLOCK.finditer(text):
        language, code = m.group(1).strip(), m.group(2)
        if language in ("python", "bash", "text", "yaml", "toml", "json"):
            continue
        try:
            tree = ast.parse(code)
        except SyntaxError:
            continue
        kinds = (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.ClassDef)
        if any(isinstance(node, kinds) for node in tree.body):
            lines.append(text.count("\n", 0, m.start()) + 1)
    return lines


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_python_block_of_the_page_runs(page, tmp_path, monkeypatch):
    text = page.read_text()
    assert not misfenced_python(text), (
        f"{page.name}: Python not fenced ```python at lines {misfenced_python(text)}"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    namespace: dict[str, object] = {"__name__": f"docs_{page.stem.replace('-', '_')}"}
    for line, block in located_blocks(text):
        # Padded so that a traceback names the line of the page.
        code = compile("\n" * (line - 1) + block, str(page), "exec")
        exec(code, namespace)


def test_the_extractor_finds_blocks_and_the_prelude():
    text = "<!-- docs-test-prelude\nx = 1\n-->\n\n```python\ny = x + 1\n```\n\n```bash\nls\n```\n"
    assert python_blocks(text) == ["x = 1\n", "y = x + 1\n"]
    assert located_blocks(text) == [(2, "x = 1\n"), (6, "y = x + 1\n")]


def test_a_failing_block_names_the_page_and_its_line(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Title\n\ntext\n\n```python\nx = 1\nraise RuntimeError('here')\n```\n")
    ((line, block),) = located_blocks(page.read_text())
    with pytest.raises(RuntimeError) as info:
        exec(compile("\n" * (line - 1) + block, str(page), "exec"), {})
    assert info.traceback[-1].lineno + 1 == 7 and str(info.traceback[-1].path) == str(page)


def test_python_under_another_fence_is_found():
    text = "```\nimport torch\n```\n\n```py\ndef f(): ...\n```\n\n```\n$ ls\n```\n\n```text\nimport x\n```\n"
    assert misfenced_python(text) == [1, 5]
