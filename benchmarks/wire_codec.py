"""Micro-benchmark of the TensorChunk codec against torch.save / torch.load(weights_only=True).

Per tensor: encode + decode time (median of `--repeats` runs) and throughput in GiB/s of tensor data, for
  * codec:       pack_tensor -> unpack_tensors on the message objects,
  * codec+proto: the same plus SerializeToString / FromString of every chunk (what the network path does),
  * torch.save:  torch.save into a BytesIO + torch.load(weights_only=True) (a single pickle-framed blob).

Run: python benchmarks/wire_codec.py [--repeats N]
"""
from __future__ import annotations

import argparse
import io
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch
from google.protobuf.internal import api_implementation

from worldstream.v1 import tensor_pb2
from worldstream.wire import DEFAULT_MAX_CHUNK_BYTES, pack_tensor, unpack_tensors

CASES = {
    "MG2 cond block [1,20,3,44,80] bf16": lambda: torch.randn(1, 20, 3, 44, 80).bfloat16(),
    "CLIP tokens [1,257,1280] bf16": lambda: torch.randn(1, 257, 1280).bfloat16(),
    "frames [12,352,640,3] uint8": lambda: torch.randint(0, 256, (12, 352, 640, 3), dtype=torch.uint8),
    "64 MiB fp32 [16,1024,1024]": lambda: torch.randn(16, 1024, 1024),
}


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def codec(tensor: torch.Tensor) -> torch.Tensor:
    return unpack_tensors(pack_tensor("t", tensor))["t"]


def codec_proto(tensor: torch.Tensor) -> torch.Tensor:
    wire = [chunk.SerializeToString() for chunk in pack_tensor("t", tensor)]
    return unpack_tensors(tensor_pb2.TensorChunk.FromString(raw) for raw in wire)["t"]


def torch_save_load(tensor: torch.Tensor) -> torch.Tensor:
    buffer = io.BytesIO()
    torch.save(tensor, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


METHODS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "codec": codec, "codec+proto": codec_proto, "torch.save/load": torch_save_load}


def median_seconds(fn: Callable[[torch.Tensor], torch.Tensor], tensor: torch.Tensor, repeats: int) -> float:
    if not torch.equal(fn(tensor), tensor):  # warm-up doubles as a correctness check
        raise AssertionError(f"{fn.__name__} did not round-trip")
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(tensor)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()

    print(f"CPU: {cpu_model()} ({torch.get_num_threads()} torch threads)")
    print(f"torch {torch.__version__}, protobuf implementation {api_implementation.Type()}, "
          f"chunk {DEFAULT_MAX_CHUNK_BYTES} B, median of {args.repeats}")
    # glibc's mmap/trim thresholds decide whether every fresh ~1 MiB buffer page-faults; they dominate here.
    malloc_env = {key: os.environ[key] for key in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
                  if key in os.environ}
    print(f"malloc tuning: {malloc_env or 'none (allocator defaults)'}")
    header = f"{'tensor':36s} {'MiB':>7s} {'chunks':>6s}" + "".join(f" {name:>22s}" for name in METHODS)
    print(header)
    print("-" * len(header))
    torch.manual_seed(0)
    for label, make in CASES.items():
        tensor = make()
        nbytes = tensor.numel() * tensor.element_size()
        chunks = sum(1 for _ in pack_tensor("t", tensor))
        row = f"{label:36s} {nbytes / 2**20:7.2f} {chunks:6d}"
        for fn in METHODS.values():
            seconds = median_seconds(fn, tensor, args.repeats)
            row += f" {seconds * 1e3:8.2f} ms {nbytes / seconds / 2**30:6.2f} GiB/s"
        print(row)


if __name__ == "__main__":
    main()
