"""Generated gRPC/protobuf code for the `worldstream.v1` API.

The `.proto` sources live in `<repo>/protos/worldstream/v1/`. Their Python modules are generated here by
grpcio-tools (never edited by hand, never committed): on first import, or whenever a `.proto` file is newer
than its generated module. `make protos` does the same ahead of time.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parent
PROTO_ROOT = _PACKAGE_DIR.parent.parent / "protos"
_PROTO_DIR = PROTO_ROOT / "worldstream" / "v1"


def _outputs(proto: Path) -> list[Path]:
    stem = proto.stem
    outs = [_PACKAGE_DIR / f"{stem}_pb2.py", _PACKAGE_DIR / f"{stem}_pb2.pyi"]
    if "service " in proto.read_text():
        outs.append(_PACKAGE_DIR / f"{stem}_pb2_grpc.py")
    return outs


def _stale() -> list[Path]:
    if not _PROTO_DIR.is_dir():
        return []
    stale = []
    for proto in sorted(_PROTO_DIR.glob("*.proto")):
        mtime = proto.stat().st_mtime
        if any(not o.exists() or o.stat().st_mtime < mtime for o in _outputs(proto)):
            stale.append(proto)
    return stale


def generate(force: bool = False) -> None:
    """Compile every `.proto` of the package (atomically, so concurrent processes never see half a file)."""
    protos = sorted(_PROTO_DIR.glob("*.proto")) if force else _stale()
    if not protos:
        return
    from grpc_tools import protoc  # build-time dependency only
    import grpc_tools

    include = str(Path(grpc_tools.__file__).parent / "_proto")
    with tempfile.TemporaryDirectory(dir=_PACKAGE_DIR) as tmp:
        all_protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in _PROTO_DIR.glob("*.proto"))
        rc = protoc.main(["grpc_tools.protoc", f"-I{PROTO_ROOT}", f"-I{include}", f"--python_out={tmp}",
                          f"--pyi_out={tmp}", f"--grpc_python_out={tmp}", *all_protos])
        if rc != 0:
            raise RuntimeError(f"protoc failed ({rc}) compiling {all_protos}")
        for produced in (Path(tmp) / "worldstream" / "v1").iterdir():
            os.replace(produced, _PACKAGE_DIR / produced.name)


generate()
