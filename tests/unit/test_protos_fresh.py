"""The checked-in generated code must equal what scripts/gen_protos.py produces now."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _load_gen():
    spec = importlib.util.spec_from_file_location("gen_protos", ROOT / "scripts" / "gen_protos.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gen_protos"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    gen = _load_gen()
    written = gen.generate(tmp_path)
    assert written, "no protos found"
    stale = []
    for path in written:
        rel = path.relative_to(tmp_path)
        checked_in = ROOT / rel
        if not checked_in.exists() or checked_in.read_bytes() != path.read_bytes():
            stale.append(str(rel))
    assert not stale, f"stale generated code, run scripts/gen_protos.py: {stale}"


def test_enum_zero_values_are_unspecified() -> None:
    from vlm.common.v1 import generation_pb2, multimodal_pb2, tensor_pb2

    for module in (tensor_pb2, multimodal_pb2, generation_pb2):
        for enum in module.DESCRIPTOR.enum_types_by_name.values():
            assert enum.values_by_number[0].name.endswith("_UNSPECIFIED"), enum.full_name


def test_proto_packages_match_directories() -> None:
    for proto in (ROOT / "protos").rglob("*.proto"):
        rel = proto.relative_to(ROOT / "protos").parent
        package = next(
            line.split()[1].rstrip(";")
            for line in proto.read_text().splitlines()
            if line.startswith("package ")
        )
        assert package == ".".join(rel.parts), proto
