"""Nothing outside `cdp_kit.bus.subjects` spells a stream or subject name.

Reads every Python source under services/*/src and libs/*/src and lists each string literal (f-strings
included, their placeholders read as `{}`) that is a stream name (`"PRIVACY"`) or a subject
(`"privacy.deleted"`, `f"events.raw.{p}"`, `"dlq.>"`). Prose that mentions a subject (a docstring, a log
line, a help text: anything with a space in it) is not a name and is left alone. Tests may spell wire
names: a test that writes `"identity.merged"` out checks the constant independently.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from cdp_testing.source import parse_file

REPO = Path(__file__).resolve().parents[3]
VOCABULARY = REPO / "libs/cdp-kit/src/cdp_kit/bus/subjects.py"

# Folders still being changed by their owners to use `cdp_kit.bus.subjects`. Each owner removes their
# entry when done; nothing else belongs here.
PENDING_ADOPTION: tuple[str, ...] = ()

STREAMS = {"EVENTS_RAW", "EVENTS_RESOLVED", "IDENTITY", "PROFILES", "SCORES", "SEGMENTS", "PRIVACY", "DLQ"}
SUBJECT = re.compile(
    r"""
    ^(?:
        (?:events\.(?:raw|resolved)|profiles\.changed|scores\.updated|segments\.(?:entered|exited)
          |identity\.(?:merged|unmerged|quarantined)|privacy\.deleted
          |scoring\.models\.changed|segmentation\.segments\.changed)(?:\.\S*)?
      | (?:events|identity|profiles|scores|segments|privacy|dlq)\.(?:>|\*|\{\})\S*
      | dlq\.[A-Z_]+(?:\.\S*)?
    )$
    """,
    re.VERBOSE,
)


def _text(node: ast.AST) -> str | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)
    return None


_BODIED = ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef


def wire_literals(path: Path) -> list[tuple[int, str]]:
    """One walk of the file's tree: `ast.walk` goes breadth first, so a module, class or function comes
    before its docstring and an f-string before its pieces, and each marks what to leave out before the
    walk reaches it (a docstring; the constant pieces of an f-string, judged as part of the whole
    f-string). Parsing the ~430 sources is most of this module's CPU; three walks of each were a third."""
    skip: set[int] = set()
    found = []
    for node in ast.walk(parse_file(path)):
        if isinstance(node, _BODIED) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                skip.add(id(first.value))
        elif isinstance(node, ast.JoinedStr):
            skip.update(id(v) for v in node.values)
        if id(node) in skip:
            continue
        text = _text(node)
        if text is not None and (text in STREAMS or SUBJECT.match(text)):
            found.append((node.lineno, text))
    return sorted(found)


def sources() -> list[Path]:
    roots = [*REPO.glob("services/*/src"), *REPO.glob("libs/*/src")]
    files = []
    for root in roots:
        for path in root.rglob("*.py"):
            rel = path.relative_to(REPO).as_posix()
            if path == VOCABULARY or rel.startswith("libs/cdp-protos/"):
                continue  # the owner itself; generated stubs
            files.append(path)
    return sorted(files)


def test_the_scan_finds_what_it_is_meant_to_find(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text(
        '"""Docstrings may say privacy.deleted."""\n'
        'A = "privacy.deleted"\n'
        'B = f"events.raw.{p}"\n'
        'C = "PROFILES"\n'
        'D = "dlq.>"\n'
        'E = f"dlq.{stream}.{durable}"\n'
        'F = "traits.plan"\n'
        'G = "privacy.deleted message %d was skipped"\n'
        'H = "scores." + name\n'
    )
    assert [text for _, text in wire_literals(sample)] == [
        "privacy.deleted",
        "events.raw.{}",
        "PROFILES",
        "dlq.>",
        "dlq.{}.{}",
    ]


def test_no_stream_or_subject_literal_outside_the_vocabulary():
    strays = []
    for path in sources():
        rel = path.relative_to(REPO).as_posix()
        if rel.startswith(PENDING_ADOPTION):
            continue
        strays += [f"{rel}:{line}: {text!r}" for line, text in wire_literals(path)]
    assert not strays, "use cdp_kit.bus.subjects instead of:\n" + "\n".join(strays)


def test_pending_folders_still_need_their_entry():
    """An entry that no longer hides anything is stale: remove it so the folder stays checked."""
    stale = []
    for folder in PENDING_ADOPTION:
        if not any(wire_literals(p) for p in sources() if p.relative_to(REPO).as_posix().startswith(folder)):
            stale.append(folder)
    assert not stale, f"remove from PENDING_ADOPTION, they use cdp_kit.bus.subjects now: {stale}"
