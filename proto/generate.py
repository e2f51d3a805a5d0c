"""Generate the Python stubs for proto/ultrakv/v1/*.proto with grpcio-tools.

``python proto/generate.py`` (``make proto``) writes *_pb2.py, *_pb2.pyi and *_pb2_grpc.py next
to the sources; ``--out DIR`` writes them under DIR/ultrakv/v1 instead (the staleness test uses
that to compare against the committed stubs).
"""

from __future__ import annotations

import argparse
import sys
from importlib import resources
from pathlib import Path

from grpc_tools import protoc

PROTO_ROOT = Path(__file__).resolve().parent
PROTO_DIR = PROTO_ROOT / "ultrakv" / "v1"


def proto_sources() -> list[Path]:
    """The .proto files of package ultrakv.v1, sorted for a stable order."""
    return sorted(PROTO_DIR.glob("*.proto"))


def generate(out_root: Path = PROTO_ROOT) -> list[Path]:
    """Run protoc over every source; return the generated files (under out_root/ultrakv/v1)."""
    out_dir = out_root / "ultrakv" / "v1"
    out_dir.mkdir(parents=True, exist_ok=True)
    well_known = resources.files("grpc_tools") / "_proto"
    sources = [str(p.relative_to(PROTO_ROOT)) for p in proto_sources()]
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *sources,
    ]
    code = protoc.main(args)
    if code != 0:
        raise RuntimeError(f"protoc failed with exit code {code}: {' '.join(args)}")
    return sorted(p for p in out_dir.iterdir() if p.name.endswith(GENERATED_SUFFIXES))


GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=PROTO_ROOT,
                        help="root to write ultrakv/v1/* under (default: next to the sources)")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
