"""Parsing the repository's own sources in tests that check conventions (metric names, wire names,
declared imports).

CPython 3.11 before 3.11.8 keeps the AST constructor's recursion depth per interpreter rather than per
thread, so `ast.parse` fails now and then with "SystemError: AST constructor recursion depth mismatch"
while another thread (a store's worker thread importing a module, say) builds an AST at the same
moment (python/cpython gh-106905). The parse itself is deterministic: trying again is the fix until the
interpreter is newer.
"""

from __future__ import annotations

import ast
import time
from pathlib import Path


def parse(source: str, filename: str = "<unknown>") -> ast.Module:
    for attempt in range(5):
        try:
            return ast.parse(source, filename=filename)
        except SystemError:
            if attempt == 4:
                raise
            time.sleep(0.01)
    raise AssertionError("unreachable")


def parse_file(path: Path) -> ast.Module:
    return parse(path.read_text(), filename=str(path))
