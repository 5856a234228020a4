"""Generate the committed Python code and stubs from ``proto/relais/v1/*.proto``.

``make proto`` writes them into ``proto/``; the drift test writes them into a temporary folder and
compares, so a ``.proto`` edited without regenerating fails the tests.
"""

from __future__ import annotations

import sys
from importlib import resources
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent.parent / "proto"
PACKAGE_DIR = PROTO_ROOT / "relais" / "v1"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")


def proto_files() -> list[Path]:
    return sorted(PACKAGE_DIR.glob("*.proto"))


def generate(out_dir: Path) -> None:
    """Run protoc (from grpcio-tools) with the python, grpc and mypy-protobuf plugins."""
    from grpc_tools import protoc  # dev dependency: imported only when generating

    well_known = resources.files("grpc_tools") / "_proto"
    # mypy-protobuf's plugins sit beside this interpreter, which need not be on PATH.
    bin_dir = Path(sys.executable).parent
    out_dir.mkdir(parents=True, exist_ok=True)
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--plugin=protoc-gen-mypy={bin_dir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={bin_dir / 'protoc-gen-mypy_grpc'}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--mypy_out={out_dir}",
        f"--mypy_grpc_out={out_dir}",
        *(str(p.relative_to(PROTO_ROOT)) for p in proto_files()),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed; see the messages above")


def main(argv: list[str]) -> None:
    generate(Path(argv[1]) if len(argv) > 1 else PROTO_ROOT)


if __name__ == "__main__":
    main(sys.argv)
