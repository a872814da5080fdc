"""The package's shape (issue 28): each method is a short file resting on the one target protocol.

Code lines are the lines that hold a token of code: blank lines, comments and docstrings (a string
that is a statement of its own) are not counted.
"""

from __future__ import annotations

import ast
import io
import tokenize
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "sra_plugin"
LIMITS = {"alignment": 80, "latent": 100, "layersync": 100, "dispersive": 100, "repa": 100, "irepa": 60, "sradts": 100}
PROTOCOL = "sra_plugin.targets"


def code_lines(source: str) -> int:
    """How many lines of ``source`` hold code, docstrings, comments and blank lines left out."""
    tokens = [t for t in tokenize.generate_tokens(io.StringIO(source).readline) if t.type not in (tokenize.COMMENT, tokenize.NL)]
    statement_start = (tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT)
    lines: set[int] = set()
    for i, tok in enumerate(tokens):
        if tok.type in (*statement_start, tokenize.ENDMARKER):
            continue
        before = tokens[i - 1].type if i else tokenize.NEWLINE
        after = tokens[i + 1].type if i + 1 < len(tokens) else tokenize.ENDMARKER
        if tok.type == tokenize.STRING and before in statement_start and after in (tokenize.NEWLINE, tokenize.ENDMARKER):
            continue  # a docstring (or any bare string statement)
        lines.update(range(tok.start[0], tok.end[0] + 1))
    return len(lines)


def imported_modules(path: Path) -> set[str]:
    """The absolute names of the modules ``path`` (a module of sra_plugin) imports from."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = "sra_plugin" if node.level == 1 else ""
            found.add(f"{base}.{node.module}" if base and node.module else (node.module or base))
            found.update(f"{base}.{alias.name}" for alias in node.names if base and not node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def test_the_counter_leaves_out_docstrings_comments_and_blank_lines():
    source = '"""Module\ndoc."""\n\n# a comment\nx = 1  # trailing\n\n\ndef f():\n    """Doc."""\n    return """not a\ndocstring"""\n'
    assert code_lines(source) == 4  # x = 1; def f():; the two lines of the returned string


@pytest.mark.parametrize("name", list(LIMITS))
def test_each_method_file_is_short(name):
    count = code_lines((PACKAGE / f"{name}.py").read_text())
    print(f"{name}.py: {count} code lines (limit {LIMITS[name]})")
    assert count < LIMITS[name], f"sra_plugin/{name}.py has {count} code lines; the limit is under {LIMITS[name]}"


@pytest.mark.parametrize("name", list(LIMITS))
def test_each_method_rests_on_the_target_protocol(name):
    assert PROTOCOL in imported_modules(PACKAGE / f"{name}.py"), f"sra_plugin/{name}.py does not import {PROTOCOL}"


def test_no_method_module_imports_the_teacher_directly():
    """Teacher code lives behind the target protocol (``targets.TeacherTarget``, ``targets.SelfTeaching``)."""
    assert not [name for name in LIMITS if "sra_plugin.teacher" in imported_modules(PACKAGE / f"{name}.py")]
