"""Fail when the committed generated stubs differ from what the pinned grpcio-tools makes of protos/.

Usage: python -m cdp_testing.protocheck check|generate PROTO_DIR OUT_DIR
"""

from __future__ import annotations

import difflib
import filecmp
import sys
import tempfile
from pathlib import Path


def generate(proto_dir: Path, out_dir: Path) -> None:
    import importlib.resources

    from grpc_tools import protoc  # dev-only dependency, pinned in the workspace root

    well_known = importlib.resources.files("grpc_tools") / "_proto"
    protos = sorted(str(p) for p in proto_dir.rglob("*.proto"))
    out_dir.mkdir(parents=True, exist_ok=True)
    args = [
        "protoc",
        f"-I{proto_dir}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")


def generated_files(root: Path) -> dict[str, Path]:
    return {
        str(p.relative_to(root)): p
        for p in root.rglob("*")
        if p.is_file() and p.suffix in {".py", ".pyi"} and "__pycache__" not in p.parts
    }


def main(argv: list[str]) -> int:
    mode, proto_dir, committed_dir = argv[0], Path(argv[1]), Path(argv[2])
    if mode == "generate":
        import shutil

        shutil.rmtree(committed_dir / "cdp", ignore_errors=True)
        generate(proto_dir, committed_dir)
        print(f"generated {len(generated_files(committed_dir))} stub files")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        fresh_dir = Path(tmp)
        generate(proto_dir, fresh_dir)
        fresh, committed = generated_files(fresh_dir), generated_files(committed_dir)
        problems: list[str] = []
        for name in sorted(fresh.keys() - committed.keys()):
            problems.append(f"missing stub: {name}")
        for name in sorted(committed.keys() - fresh.keys()):
            problems.append(f"stub without a proto: {name}")
        for name in sorted(fresh.keys() & committed.keys()):
            if not filecmp.cmp(fresh[name], committed[name], shallow=False):
                diff = difflib.unified_diff(
                    committed[name].read_text().splitlines(),
                    fresh[name].read_text().splitlines(),
                    f"committed/{name}",
                    f"generated/{name}",
                    lineterm="",
                    n=1,
                )
                problems.append(f"stale stub: {name}\n" + "\n".join(list(diff)[:20]))
    if problems:
        print("Generated stubs are stale; run `make proto` and commit the result:", file=sys.stderr)
        for problem in problems:
            print("  " + problem, file=sys.stderr)
        return 1
    print(f"proto stubs up to date ({len(fresh)} files)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
