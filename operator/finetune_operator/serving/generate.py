"""Regenerate the *_pb2.py modules from the .proto files with grpcio-tools' protoc."""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTOS = ("serving_config.proto", "triton_model_config.proto")


def generate(out_dir: Path = HERE) -> list[Path]:
    from grpc_tools import protoc

    args = ["protoc", f"-I{HERE}", f"--python_out={out_dir}", f"--pyi_out={out_dir}", *(str(HERE / p) for p in PROTOS)]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed")
    return [out_dir / p.replace(".proto", suffix) for p in PROTOS for suffix in ("_pb2.py", "_pb2.pyi")]


if __name__ == "__main__":
    for path in generate(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE):
        print(f"wrote {path}")
