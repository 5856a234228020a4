"""The committed generated code matches the .proto files (run `make proto` after editing them)."""

from __future__ import annotations

import re
from pathlib import Path

from common.protogen import GENERATED_SUFFIXES, PACKAGE_DIR, generate, proto_files

# Lines that name the generator's own version: a newer grpcio-tools changes them, not the contract.
VERSION_LINE = re.compile(r"(Protobuf Python Version|GRPC_GENERATED_VERSION|^\s+\d+,$|mypy-protobuf)")


def normalised(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if not VERSION_LINE.search(line)]


def test_generated_code_matches_the_protos(tmp_path: Path) -> None:
    generate(tmp_path)
    fresh_dir = tmp_path / "relais" / "v1"
    for proto in proto_files():
        for suffix in GENERATED_SUFFIXES:
            name = proto.stem + suffix
            committed = PACKAGE_DIR / name
            assert committed.exists(), f"{name} is missing: run `make proto`"
            assert normalised(committed) == normalised(fresh_dir / name), f"{name} drifted: run `make proto`"


def test_no_generated_file_without_its_proto() -> None:
    stems = {p.stem for p in proto_files()}
    for path in PACKAGE_DIR.glob("*_pb2*.py*"):
        assert path.name.split("_pb2")[0] in stems, f"{path.name} has no .proto: remove it"
