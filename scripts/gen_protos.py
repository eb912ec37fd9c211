"""Regenerate the checked-in Python code for protos/ (messages, gRPC stubs and .pyi stubs).

    uv run python scripts/gen_protos.py [--out DIR]

The output lands beside the hand-written code of the shared `vlm` package: the proto package
`vlm.common.v1` becomes `vlm/common/v1/*_pb2*.py`. tests/unit/test_protos_fresh.py regenerates
into a temp dir and fails when the checked-in files differ.
"""

from __future__ import annotations

import argparse
import importlib.resources
import sys
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"


def proto_files() -> list[Path]:
    return sorted(PROTO_ROOT.rglob("*.proto"))


def generate(out: Path) -> list[Path]:
    """Generate code for every proto under protos/ into `out`; return the files written."""
    out.mkdir(parents=True, exist_ok=True)
    well_known = importlib.resources.files("grpc_tools") / "_proto"
    files = proto_files()
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *[str(f.relative_to(PROTO_ROOT)) for f in files],
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")
    written = []
    for f in files:
        stem = f.relative_to(PROTO_ROOT).with_suffix("")
        for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py"):
            written.append(out / f"{stem}{suffix}")
    # Every generated directory is a regular package.
    for d in {p.parent for p in written}:
        while d != out and d.is_relative_to(out):
            init = d / "__init__.py"
            if not init.exists():
                init.write_text("")
            d = d.parent
    return written


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT)
    args = parser.parse_args()
    for path in generate(args.out):
        print(path.relative_to(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
