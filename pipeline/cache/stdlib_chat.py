"""The ``stdlib-chat`` corpus: prompt/completion records made from the standard library's sources.

Nothing is downloaded: each public function or method of the running Python's standard library
(tests excluded, as in ``stdlib``) that has a docstring becomes one record whose prompt is its
signature, with the module (and class) as a comment line, and whose completion is its docstring
(``inspect.cleandoc``-ed by ``ast.get_docstring``)::

    prompt:      "# json.decoder.JSONDecoder\\ndef decode(self, s, _w=WHITESPACE.match):"
    completion:  "Return the Python representation of ``s`` (a ``str`` instance ..."

Records come in file order, then definition order, so every run reads the same corpus. The
embedded default teacher's chat template (``tokenizer.PYTHON_CHAT_TEMPLATE``) renders such a
record as Python source: the signature, then the docstring.
"""

from __future__ import annotations

import ast
import sysconfig
from collections.abc import Iterator
from pathlib import Path

STDLIB_CHAT = "stdlib-chat"
MIN_DOCSTRING_CHARS = 20  # shorter docstrings ("Return x.") teach little and are skipped
RECORDS_VERSION = 1  # bump when the records change; part of the corpus fingerprint

_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
_Definition = ast.FunctionDef | ast.AsyncFunctionDef


class StdlibChatFile(type(Path())):  # type: ignore[misc]
    """A standard-library source read as prompt/completion records (the ``stdlib-chat`` spec),
    not as one text document. A ``Path`` otherwise: ``stat``, names and sorting work as usual."""


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files() -> list[Path]:
    """The running Python's standard-library ``.py`` sources, tests excluded, sorted (the
    ``stdlib`` corpus; ``stdlib-chat`` reads the same files)."""
    root = stdlib_root()
    files = [
        p
        for p in root.rglob("*.py")
        if not (_SKIP_DIRS & set(p.relative_to(root).parts[:-1])) and not p.name.startswith("test_")
    ]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def module_name(path: Path, root: Path) -> str:
    """``json/decoder.py`` → ``json.decoder``; ``json/__init__.py`` → ``json``."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


def _public(node: ast.AST) -> bool:
    return isinstance(node, _Definition | ast.ClassDef) and not node.name.startswith("_")


def _signature(node: _Definition) -> str:
    """``def join(a, *p):`` — the header line as written, decorators and body left out."""
    prefix = "async def" if isinstance(node, ast.AsyncFunctionDef) else "def"
    returns = f" -> {ast.unparse(node.returns)}" if node.returns is not None else ""
    return f"{prefix} {node.name}({ast.unparse(node.args)}){returns}:"


def _definitions(tree: ast.Module) -> Iterator[tuple[str | None, _Definition]]:
    """(class name or None, function) for the module's public functions and the public methods
    of its public classes, in definition order."""
    for node in tree.body:
        if not _public(node):
            continue
        if isinstance(node, ast.ClassDef):
            for member in node.body:
                if isinstance(member, _Definition) and _public(member):
                    yield node.name, member
        else:
            assert isinstance(node, _Definition)
            yield None, node


def signature_records(source: str, module: str) -> Iterator[tuple[int, str, str]]:
    """(line, prompt, completion) of every documented public function and method of ``source``.

    Raises:
        SyntaxError: the source does not parse.
    """
    tree = ast.parse(source)
    for owner, node in _definitions(tree):
        docstring = ast.get_docstring(node, clean=True)
        if docstring is None or len(docstring.strip()) < MIN_DOCSTRING_CHARS:
            continue
        context = module if owner is None else f"{module}.{owner}"
        yield node.lineno, f"# {context}\n{_signature(node)}", docstring.strip()


def stdlib_records(path: Path) -> Iterator[tuple[int, str, str]]:
    """(line, prompt, completion) of the standard-library source ``path``.

    Raises:
        SyntaxError, ValueError: the source does not parse.
    """
    source = path.read_bytes().decode("utf-8", errors="replace")
    return signature_records(source, module_name(path, stdlib_root()))
