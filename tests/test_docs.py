"""The README's troubleshooting section lists every error the package raises."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _normalize(text: str) -> str:
    """Words only: code marks, punctuation and line breaks differ between source and README."""
    return " ".join(re.sub(r"[`'\"(),.:;\[\]{}]", " ", text).split())


def _troubleshooting() -> str:
    readme = (ROOT / "README.md").read_text()
    return _normalize(readme[readme.index("## Troubleshooting") : readme.index("## Project layout")])


def _literal_pieces(node: ast.AST) -> list[str]:
    """The message's literal text, with a NUL where a value is formatted in."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.JoinedStr):
        return [v.value if isinstance(v, ast.Constant) else "\0" for v in node.values]
    if isinstance(node, ast.BinOp):
        return [*_literal_pieces(node.left), "\0", *_literal_pieces(node.right)]
    return ["\0"]


def _package_errors() -> list[tuple[str, int, str]]:
    """(file, line, the first words of its first literal fragment) for each error built."""
    found = []
    for path in sorted((ROOT / "keras_lightning").rglob("*.py")):
        tree = ast.parse(path.read_text())
        shims = {  # Keras' own messages, reproduced in the dynamo substitutes (compiled.py)
            id(inner)
            for fn in ast.walk(tree)
            if isinstance(fn, ast.FunctionDef) and fn.name.startswith("_traceable_")
            for inner in ast.walk(fn)
        }
        for node in ast.walk(tree):
            if id(node) in shims or not isinstance(node, ast.Call) or not node.args:
                continue
            name = getattr(node.func, "id", "")
            if not name.endswith("Error") or name == "AttributeError":  # module __getattr__
                continue
            fragments = [
                _normalize(f) for f in "".join(_literal_pieces(node.args[0])).split("\0")
            ]
            fragments = [f for f in fragments if len(f) >= 12]
            if fragments:
                found.append((str(path.relative_to(ROOT / "keras_lightning")), node.lineno, " ".join(fragments[0].split()[:4])))
    return found


ERRORS = _package_errors()


def test_the_package_raises_errors_to_document():
    assert len(ERRORS) > 40  # the scan found the package's messages


@pytest.mark.parametrize(("where", "line", "words"), ERRORS, ids=[f"{w}:{n}" for w, n, _ in ERRORS])
def test_every_error_is_in_the_troubleshooting_section(where, line, words):
    assert words in _troubleshooting(), (
        f"{where}:{line} raises a message starting {words!r} that README's Troubleshooting "
        "section does not list"
    )
