"""The repository stands alone: every document it links to is in it, and nothing in it points outside.

A clone is all a reader has. A link to a design document kept beside the checkout, a path on the
machine of whoever wrote the line, or a relative link whose file was renamed all work on one machine
and are dead everywhere else - and go unnoticed precisely because they work where they were written.
So this scans every file git tracks (and new files not ignored yet, so a dead link fails before it is
committed) and fails naming each file, line and target:

- markdown links (inline, reference-style, HTML `href`/`src`) that are not URLs must name a file or
  folder inside the repository that exists, and a `#fragment` into a markdown file must name one of
  its headings;
- a document named anywhere (`something.md`, in prose, comments or docstrings) must be one the
  repository holds;
- no text may lead out of the checkout: a sibling folder of the checkout (a path up out of it) or an absolute
  path on a developer's machine (home folders, the build machine's workspace);
- a repository path quoted in `docs/` (`libs/cdp-kit/src/cdp_kit/bus/consumer.py`) must exist, so the
  architecture document's "where to find a rule" table follows files that move.

The Dockerfile is exempt from the machine-path rule only: its absolute paths are the image's.
"""

from __future__ import annotations

import re
import subprocess
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
THIS = Path(__file__).resolve()

# Absolute paths that name a developer's or build machine's filesystem, never the image's or a pod's
# (those are /app, /var/lib/cdp, /tmp, /etc/...). Spelled in pieces so this file does not match itself.
MACHINE_PATH = re.compile(r"(?<![\w.~-])/(?:" + "|".join(["ho" + "me", "Us" + "ers", "ro" + "ot", "wo" + "rk"]) + r")/")
LEAVES_WORKSPACE = re.compile(r"\.\./" + "sha" + r"red\b|\b" + "sha" + r"red/" + "des" + "ign/")
# Exempt from MACHINE_PATH: files whose absolute paths are inside the container image.
IMAGE_FILES = {"Dockerfile"}

INLINE_LINK = re.compile(r"!?\[(?:[^\]\\]|\\.)*\]\(\s*<?([^)\s>]+)>?(?:\s+[\"'(][^)]*)?\)")
REFERENCE_LINK = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$")
HTML_LINK = re.compile(r"""\b(?:href|src)\s*=\s*["']([^"']+)["']""")
NAMED_DOCUMENT = re.compile(r"(?<![\w/.-])((?:\.{1,2}/|[\w-]+/)*[\w.-]*[A-Za-z]\.md)\b")
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
FENCE = re.compile(r"^\s{0,3}(`{3,}|~{3,})")
QUOTED_PATH = re.compile(r"`((?:bench|deploy|docs|libs|protos|services|tests)/[\w./-]*)`")


def repository_files() -> list[Path]:
    """Tracked files plus new ones git does not ignore, that exist on disk, this test excepted."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.decode()
    files = {ROOT / name for name in listed.split("\0") if name}
    return sorted(path for path in files if path.is_file() and path.resolve() != THIS)


def read_text(path: Path) -> str | None:
    data = path.read_bytes()
    if b"\0" in data[:8192]:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def outside_fences(text: str) -> list[tuple[int, str]]:
    """(line number, line) of a markdown text, without the lines of fenced code blocks."""
    lines, fence = [], None
    for number, line in enumerate(text.splitlines(), 1):
        opened = FENCE.match(line)
        if fence is None and opened:
            fence = opened.group(1)[0]
        elif fence is not None and opened and opened.group(1)[0] == fence:
            fence = None
        elif fence is None:
            lines.append((number, re.sub(r"`[^`]*`", "", line)))  # inline code is not a link either
    return lines


def slug(heading: str) -> str:
    """A heading's anchor as GitHub makes it: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"<[^>]+>", "", heading).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The anchors of a markdown file's headings (the words inside backticks count, as on GitHub)."""
    seen: Counter[str] = Counter()
    found = set()
    fence = None
    for line in path.read_text(encoding="utf-8").splitlines():
        opened = FENCE.match(line)
        if fence is None and opened:
            fence = opened.group(1)[0]
            continue
        if fence is not None:
            if opened and opened.group(1)[0] == fence:
                fence = None
            continue
        heading = re.match(r"^\s{0,3}#{1,6}\s+(.*?)\s*#*\s*$", line)
        if heading is None:
            continue
        base = slug(heading.group(1).replace("`", ""))
        found.add(base if not seen[base] else f"{base}-{seen[base]}")
        seen[base] += 1
    return found


def inside(path: Path) -> bool:
    try:
        path.resolve().relative_to(ROOT)
    except ValueError:
        return False
    return True


def check_link(source: Path, target: str) -> str | None:
    """Why a link of `source` to `target` is broken, or None when it is fine."""
    if SCHEME.match(target) or target.startswith("//"):
        return None  # a URL (https:, mailto:): not a file of this repository
    location, _, fragment = target.partition("#")
    location = location.split("?", 1)[0]
    if not location:
        if fragment and fragment not in anchors(source):
            return f"no heading for #{fragment} in this file"
        return None
    resolved = (ROOT / location.lstrip("/")) if location.startswith("/") else (source.parent / location)
    if not inside(resolved):
        return "leaves the repository"
    if not resolved.exists():
        return "no such file or folder in the repository"
    if fragment and resolved.suffix == ".md" and fragment not in anchors(resolved):
        return f"no heading for #{fragment} in {resolved.relative_to(ROOT)}"
    return None


def markdown_links(text: str) -> list[tuple[int, str]]:
    found = []
    for number, line in outside_fences(text):
        for pattern in (INLINE_LINK, REFERENCE_LINK, HTML_LINK):
            found.extend((number, match.group(1)) for match in pattern.finditer(line))
    return found


def problems() -> list[str]:
    files = repository_files()
    documents = [path.relative_to(ROOT).as_posix() for path in files if path.suffix == ".md"]
    found = []
    for path in files:
        text = read_text(path)
        if text is None:
            continue
        name = path.relative_to(ROOT).as_posix()
        for number, line in enumerate(text.splitlines(), 1):
            if LEAVES_WORKSPACE.search(line):
                found.append(f"{name}:{number}: points outside the repository: {line.strip()[:120]}")
                continue
            elif path.name not in IMAGE_FILES and MACHINE_PATH.search(line):
                found.append(f"{name}:{number}: names a path on a developer's machine: {line.strip()[:120]}")
            for match in NAMED_DOCUMENT.finditer(line):
                document = match.group(1)
                here, there = path.parent / document, ROOT / document
                if (inside(here) and here.exists()) or (inside(there) and there.exists()):
                    continue
                if any(held == document or held.endswith("/" + document) for held in documents):
                    continue  # named by the end of its path ("the service's README.md", "training/README.md")
                found.append(f"{name}:{number}: names {document}, which the repository does not hold")
        if name.startswith("docs/"):
            for number, line in enumerate(text.splitlines(), 1):
                for match in QUOTED_PATH.finditer(line):
                    if not (ROOT / match.group(1)).exists():
                        found.append(f"{name}:{number}: quotes {match.group(1)}, which the repository does not hold")
        if path.suffix == ".md":
            for number, target in markdown_links(text):
                reason = check_link(path, target)
                if reason:
                    found.append(f"{name}:{number}: link to {target}: {reason}")
    return found


def test_nothing_in_the_repository_points_outside_it_or_at_a_missing_file():
    found = problems()
    assert not found, "links or paths that only work on one machine:\n" + "\n".join(found)


def test_the_root_readme_links_the_architecture_document():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    links = [target for _number, target in markdown_links(readme)]
    assert "docs/architecture.md" in links
    assert (ROOT / "docs" / "architecture.md").is_file()


def test_the_scan_finds_what_it_is_meant_to_find():
    """The checks themselves, on lines written to fail them (so a regex that matches nothing is caught)."""
    outside = "../" + "shared/design/ARCHITECTURE.md"
    assert LEAVES_WORKSPACE.search(f"see [the design]({outside})")
    assert MACHINE_PATH.search("/" + "home/ada/cdp/README.md")
    assert MACHINE_PATH.search("python at /" + "root/.pyenv/versions/3.12/bin/python3.12")
    assert not MACHINE_PATH.search("sqlite:////var/lib/cdp/identity.db and /tmp/x and /app/.venv")
    text = "[a](b.md) and ![img](c.png) and `[code](no.md)`\n```\n[x](ignored.md)\n```\n[ref]: d.md"
    assert markdown_links(text) == [(1, "b.md"), (1, "c.png"), (5, "d.md")]
    readme = ROOT / "README.md"
    assert check_link(readme, "https://example.com/x.md") is None
    assert check_link(readme, "deploy/README.md") is None
    assert check_link(readme, "deploy/NOPE.md") == "no such file or folder in the repository"
    assert check_link(readme, outside) == "leaves the repository"
    assert check_link(readme, "#no-such-heading-anywhere").startswith("no heading")
    assert check_link(readme, "#two-commands") is None
    assert QUOTED_PATH.findall("see `libs/cdp-kit/src/cdp_kit/auth.py` and `cdp_kit.auth`") == [
        "libs/cdp-kit/src/cdp_kit/auth.py"
    ]
    assert [m.group(1) for m in NAMED_DOCUMENT.finditer("(ARCHITECTURE.md §2) and services/x/README.md")] == [
        "ARCHITECTURE.md",
        "services/x/README.md",
    ]
