"""Generates the `worldstream.v1` protobuf/gRPC modules from `../protos` before the package is built, so that
wheels and editable installs ship them (they are never committed and never generated at run time)."""
from __future__ import annotations

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
PROTO_ROOT = HERE.parent / "protos"
OUT_DIR = HERE / "worldstream" / "v1"


def generate_stubs() -> None:
    protos = sorted(PROTO_ROOT.glob("worldstream/v1/*.proto"))
    if not protos:
        if list(OUT_DIR.glob("*_pb2.py")):  # building from an sdist that already holds them
            return
        raise SystemExit(f"no .proto files under {PROTO_ROOT}: build from a checkout of the repository")
    import grpc_tools
    from grpc_tools import protoc

    include = Path(grpc_tools.__file__).parent / "_proto"
    args = ["grpc_tools.protoc", f"-I{PROTO_ROOT}", f"-I{include}", f"--python_out={HERE}", f"--pyi_out={HERE}",
            f"--grpc_python_out={HERE}", *(str(p.relative_to(PROTO_ROOT)) for p in protos)]
    if protoc.main(args) != 0:
        raise SystemExit(f"protoc failed on {[p.name for p in protos]}")


class BuildPyWithProtos(build_py):
    def run(self) -> None:
        generate_stubs()
        super().run()


setup(cmdclass={"build_py": BuildPyWithProtos})
