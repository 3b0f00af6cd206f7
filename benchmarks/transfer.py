"""Per-pair vs batched transfer of EDEN frame pairs between the encoder half and the decoder half (issue 9, item 4).

    python benchmarks/transfer.py --config eden/interpolate --set init_seed=0 --json out/transfer.json \
        --plot out/transfer.png                                  # the full grid, on a GPU
    python benchmarks/transfer.py --quick                        # tiny config on the CPU, well under a minute
    python benchmarks/transfer.py --mg2 --config mg2/universal --set init_seed=0   # Matrix-Game-2's cond_concat

One clip (`--frames`, default 48; synthetic: a moving gradient with noise, or the first frames of `--video`) per
size, and per cell:
  * mode: per pair (K = 1) or batched (K = 4, 8, 16 pairs per message and per forward);
  * payload: tokens_fp32 (what the published split fork sends), tokens_bf16, frames (padded uint8) or frames_jpeg;
  * serialisation and path: the fork's `torch.save` blob (a local buffer, loaded with weights_only=True: a
    baseline only, never sent anywhere), our wire format (TensorChunk messages, serialised and parsed) in one
    process, gRPC between real encoder and decoder service processes over loopback (plus the client process
    sending raw RGB frames and receiving raw RGB frames), and `cuda_ipc`: the same services with the same-host
    GPU data plane (`transfer.cuda_ipc`, wire/cuda_ipc.py), the payload left on the GPU and handed over through a
    ring of CUDA IPC buffers while gRPC carries the control messages (services on a GPU only; not frames_jpeg,
    whose JPEG files are decoded on the CPU).
It reports bytes per pair between the halves (for cuda_ipc the control messages only), encode / transfer / decode
milliseconds per pair (device-synchronised in one process; the services' own per-batch stage times: with cuda_ipc,
transfer ends once the decoder has queued its device-to-device copy out of the slot), pairs/s end to end, p50 / p99
over `--runs` of the latency to the first interpolated frame, and peak RSS (VmHWM, reset per cell, of every process of the cell)
and, on a GPU, peak VRAM (in one process: the caching allocator's peak; services: the GPU memory they hold, from
nvidia-smi). Output: a table on stdout, `--json`, and `--plot` (pairs/s and bytes per pair against K).

`--mg2` runs the same comparison for Matrix-Game-2's condition stream instead: `cond_concat` encoded and sent per
block as the encoder service does (in one process and over gRPC from the real encoder service) against the
reference's way, one batched encode of the whole padded video before the first frame.
"""
from __future__ import annotations

import argparse
import asyncio
import io
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from worldstream.client.interpolate import interpolate, read_video
from worldstream.engine.config import load_config
from worldstream.engine.eden import EdenInterpolator
from worldstream.engine.interpolation import PAYLOADS, interpolate_frames
from worldstream.serving.processes import ServiceStack
from worldstream.v1 import tensor_pb2
from worldstream.wire import TensorAssembler, pack_tensors

sys.path.insert(0, str(Path(__file__).resolve().parent))
from block_loop import git_commit  # noqa: E402  (the engine benchmark's helpers)
from services import gpu_memory_mib  # noqa: E402

FULL_SIZES = ["352x640", "480x832", "1088x1920"]
CLIENT_PAYLOADS = {"tokens_fp32": "tokens", "tokens_bf16": "tokens-bf16", "frames": "frames",
                   "frames_jpeg": "frames-jpeg"}
PATHS = ("torch.save", "wire", "grpc", "cuda_ipc")  # the first two in this process
SERVICE_PATHS = {"grpc": "false", "cuda_ipc": "true"}  # -> the services' transfer.cuda_ipc
IPC_CONTROL_BYTES = 4096  # per batch at most: a cuda_ipc cell with more sent its payload over gRPC
QUICK = {"config": "eden/interpolate_tiny", "sizes": ["64x96"], "frames": 9, "batches": [1, 4], "runs": 2,
         "mg2_config": "mg2/universal_tiny", "blocks": 2, "mg2_warmup_blocks": 0, "threads": 1}


# ---- measurements --------------------------------------------------------------------------------------------

def synchronized_timer(device: torch.device):
    """perf_counter after the device's queued work, so that stage times are the work's, not its launch's."""
    if device.type != "cuda":
        return time.perf_counter

    def timer() -> float:
        torch.cuda.synchronize(device)
        return time.perf_counter()
    return timer


def reset_peak_rss(pids: list[int]) -> None:
    """Reset VmHWM (Linux: clear_refs 5) so that it holds the peak of what follows."""
    for pid in pids:
        try:
            Path(f"/proc/{pid}/clear_refs").write_text("5")
        except OSError:
            pass


def peak_rss_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return math.nan


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (linear between sorted values; with few runs p99 is about the largest)."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def torch_save_transport(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], int]:
    """The fork's pack_enc_out / unpack_enc_out: torch.save of the host tensors into a local buffer, then
    torch.load (weights_only=True: this blob never leaves the process, and nothing is unpickled from a peer)."""
    buffer = io.BytesIO()
    torch.save({name: tensor.cpu() for name, tensor in tensors.items()}, buffer)
    size = buffer.tell()
    buffer.seek(0)
    return torch.load(buffer, map_location="cpu", weights_only=True), size


def wire_transport(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], int]:
    """Our wire format in one process: TensorChunk messages, serialised and parsed back, reassembled."""
    messages = [chunk.SerializeToString() for chunk in pack_tensors(tensors)]
    assembler = TensorAssembler(max_tensor_bytes=1 << 40)
    received = dict(assembler.assemble(tensor_pb2.TensorChunk.FromString(data) for data in messages))
    return received, sum(len(data) for data in messages)


TRANSPORTS = {"torch.save": torch_save_transport, "wire": wire_transport}


def cell_summary(runs: list[dict], pairs: int) -> dict:
    """Per-pair means over the runs' batches, medians of throughput, percentiles of first-frame latency."""
    def per_pair(key: str) -> float:
        return statistics.median(run["stages"].get(key, math.nan) for run in runs) / pairs * 1000
    return {"pairs": pairs, "bytes_per_pair": statistics.median(run["payload_bytes"] for run in runs) / pairs,
            "encode_ms": per_pair("encode"), "transfer_ms": per_pair("transfer"), "decode_ms": per_pair("decode"),
            "pairs_per_s": statistics.median(run["pairs_per_s"] for run in runs),
            "first_frame_p50_ms": percentile([run["first_frame_s"] for run in runs], 50) * 1000,
            "first_frame_p99_ms": percentile([run["first_frame_s"] for run in runs], 99) * 1000,
            "first_frame_runs_ms": [run["first_frame_s"] * 1000 for run in runs]}


def in_process_cell(interpolator: EdenInterpolator, clip: list[torch.Tensor], payload: str, batch: int,
                    transport: str, runs: int) -> dict:
    timer = synchronized_timer(interpolator.device)
    reset_peak_rss([os.getpid()])
    if interpolator.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(interpolator.device)
    measured = []
    for _ in range(runs):
        started = timer()
        first, stages, payload_bytes, pairs = math.nan, {}, 0, 0
        for result in interpolate_frames(interpolator, clip, factor=2, batch=batch, payload=payload,
                                         transport=TRANSPORTS[transport], timer=timer):
            if math.isnan(first):
                first = timer() - started
            for stage, seconds in result.stage_seconds.items():
                stages[stage] = stages.get(stage, 0.0) + seconds
            payload_bytes += result.payload_bytes
            pairs += result.frames.shape[0]
        measured.append({"stages": stages, "payload_bytes": payload_bytes, "first_frame_s": first,
                         "pairs_per_s": pairs / (timer() - started)})
    cell = cell_summary(measured, len(clip) - 1)
    cell["rss_mib"] = {"process": peak_rss_mib(os.getpid())}
    if interpolator.device.type == "cuda":
        cell["vram_mib"] = {"process": torch.cuda.max_memory_allocated(interpolator.device) / 2**20}
    return cell


def grpc_cell(stack: ServiceStack, clip: list[np.ndarray], payload: str, batch: int, runs: int) -> dict:
    """A cell through the services (paths grpc and cuda_ipc: the stack's transfer.cuda_ipc says which)."""
    pids = [os.getpid(), stack.encoder.process.pid, stack.decoder.process.pid]
    reset_peak_rss(pids)
    measured = []
    for _ in range(runs):
        result = interpolate(stack.address, clip, batch=batch, payload=CLIENT_PAYLOADS[payload], frame_encoding="raw")
        stages: dict[str, float] = {}
        for b in result.batches:
            for stage, seconds in b.stage_seconds.items():
                stages[stage] = stages.get(stage, 0.0) + seconds
        measured.append({"stages": stages, "payload_bytes": result.payload_bytes, "pairs_per_s": result.pairs_per_second,
                         "first_frame_s": result.time_to_first_frame})
    cell = cell_summary(measured, len(clip) - 1)
    cell["rss_mib"] = dict(zip(("client", "encoder", "decoder"), (peak_rss_mib(pid) for pid in pids)))
    gpu = gpu_memory_mib()
    if gpu:
        cell["vram_mib"] = {"encoder": gpu.get(str(pids[1]), math.nan), "decoder": gpu.get(str(pids[2]), math.nan)}
    return cell


# ---- the clip ------------------------------------------------------------------------------------------------------

def synthetic_clip(frames: int, height: int, width: int, seed: int = 0) -> list[np.ndarray]:
    """A gradient moving 4 px per frame with mild noise: neighbouring frames alike, JPEG sizes like a video's."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([np.sin(x / 37) * 100 + 128, np.cos(y / 23) * 100 + 128, (x + y) * 255 / (height + width)], -1)
    return [np.clip(np.roll(base, 4 * t, axis=1) + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8)
            for t in range(frames)]


def clips(args: argparse.Namespace) -> dict[str, list[np.ndarray]]:
    if args.video:
        frames, _, _ = read_video(args.video)
        clip = [frame for _, frame in zip(range(args.frames), frames)]
        return {f"{clip[0].shape[0]}x{clip[0].shape[1]}": clip}
    sizes = {}
    for size in args.sizes:
        height, width = (int(v) for v in size.lower().split("x"))
        sizes[size] = synthetic_clip(args.frames, height, width)
    return sizes


# ---- output ----------------------------------------------------------------------------------------------------

COLUMNS = [("size", 9, "s"), ("path", 10, "s"), ("payload", 11, "s"), ("K", 3, "d"), ("MiB/pair", 8, ".3f"),
           ("enc ms", 7, ".2f"), ("xfer ms", 7, ".2f"), ("dec ms", 7, ".2f"), ("pairs/s", 8, ".2f"),
           ("1st p50", 8, ".1f"), ("1st p99", 8, ".1f"), ("RSS MiB", 8, ".0f"), ("VRAM MiB", 8, ".0f")]


def header() -> str:
    return " ".join(f"{name:>{width}s}" for name, width, _ in COLUMNS)


def row(cell: dict) -> str:
    """A cell's line of the table: per-pair times, and the memory of all its processes together."""
    values = [cell["size"], cell["path"], cell["payload"], cell["batch"], cell["bytes_per_pair"] / 2**20,
              cell["encode_ms"], cell["transfer_ms"], cell["decode_ms"], cell["pairs_per_s"],
              cell["first_frame_p50_ms"], cell["first_frame_p99_ms"], sum(cell["rss_mib"].values()),
              sum(cell["vram_mib"].values()) if "vram_mib" in cell else math.nan]
    return " ".join(f"{value:>{width}{spec}}" for (_, width, spec), value in zip(COLUMNS, values))


def plot(cells: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = list(dict.fromkeys(cell["size"] for cell in cells))
    figure, axes = plt.subplots(2, len(sizes), figsize=(6 * len(sizes), 8), squeeze=False)
    for column, size in enumerate(sizes):
        for key in dict.fromkeys((cell["path"], cell["payload"]) for cell in cells if cell["size"] == size):
            line = sorted((c for c in cells if c["size"] == size and (c["path"], c["payload"]) == key),
                          key=lambda c: c["batch"])
            batches = [c["batch"] for c in line]
            style = {"linestyle": {"torch.save": ":", "wire": "--", "grpc": "-", "cuda_ipc": "-."}[key[0]],
                     "marker": "o",
                     "color": f"C{PAYLOADS.index(key[1])}", "label": " ".join(key)}
            axes[0][column].plot(batches, [c["pairs_per_s"] for c in line], **style)
            axes[1][column].plot(batches, [c["bytes_per_pair"] / 2**20 for c in line], **style)
        axes[0][column].set_title(size)
        axes[0][column].set_ylabel("pairs/s (end to end)")
        axes[1][column].set_ylabel("MiB per pair between the halves")
        for axis in axes[:, column]:
            axis.set_xscale("log", base=2)
            axis.set_xlabel("K (pairs per message and forward; 1 = per pair)")
            axis.grid(alpha=0.3)
        axes[1][column].set_yscale("log")
    axes[0][0].legend(fontsize=7)
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)


def machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({torch.get_num_threads()} threads)"
    except OSError:
        pass
    return platform.machine()


# ---- EDEN --------------------------------------------------------------------------------------------------------

def not_applicable(path: str, payload: str, device: torch.device) -> str | None:
    """Why a cell cannot run here (None: it can)."""
    if path != "cuda_ipc":
        return None
    if device.type != "cuda":
        return "cuda_ipc needs the services on a CUDA device"
    if payload == "frames_jpeg":
        return "cuda_ipc does not carry frames_jpeg (its JPEG files are decoded on the CPU)"
    return None


def check_cuda_ipc_used(cell: dict) -> None:
    """A cuda_ipc cell whose payload went over gRPC (the decoder did not offer, or the encoder did not choose, CUDA
    IPC: see the services' logs) must not pass for one."""
    if cell["bytes_per_pair"] * cell["pairs"] > IPC_CONTROL_BYTES * math.ceil(cell["pairs"] / cell["batch"]):
        raise RuntimeError(f"the cuda_ipc services sent {cell['bytes_per_pair']:.0f} bytes per pair: the payload went "
                           "over gRPC (see 'payload transport' in the decoder's log)")


def run_eden(args: argparse.Namespace, record: dict) -> None:
    cfg = load_config(args.config, args.overrides)
    interpolator = EdenInterpolator(cfg)
    print(f"# EDEN transfer | {args.config} {' '.join(args.overrides)} | {record['machine']} | commit "
          f"{record['commit']} | {record['date']} | {args.frames} frames, x2, {args.runs} runs per cell")
    skipped = {(path, payload): why for path in args.paths for payload in args.payloads
               if (why := not_applicable(path, payload, interpolator.device))}
    for (path, payload), why in skipped.items():
        print(f"# not applicable: {path} {payload}: {why}")
    record["not_applicable"] = [{"path": path, "payload": payload, "why": why}
                                for (path, payload), why in skipped.items()]
    print(header())
    cells = record["cells"]
    stacks: dict[str, ServiceStack] = {}
    try:
        for path in args.paths:
            if path in SERVICE_PATHS and any((path, payload) not in skipped for payload in args.payloads):
                stacks[path] = ServiceStack(args.config, args.log_dir / path,
                                            [*args.overrides, f"transfer.cuda_ipc={SERVICE_PATHS[path]}"],
                                            startup_timeout=900).__enter__()
        for size, clip in clips(args).items():
            tensors = [torch.from_numpy(frame).permute(2, 0, 1).contiguous() for frame in clip]
            warm = [tensors[0], tensors[1]]
            for payload in args.payloads:  # one warm-up per payload: lazy initialisation stays out of the cells
                list(interpolate_frames(interpolator, warm, factor=2, batch=1, payload=payload))
                for path, stack in stacks.items():
                    if (path, payload) not in skipped:
                        interpolate(stack.address, clip[:2], batch=1, payload=CLIENT_PAYLOADS[payload],
                                    frame_encoding="raw")
            for path in args.paths:
                for payload in args.payloads:
                    if (path, payload) in skipped:
                        continue
                    for batch in args.batches:
                        if path in SERVICE_PATHS:
                            cell = grpc_cell(stacks[path], clip, payload, batch, args.runs)
                        else:
                            cell = in_process_cell(interpolator, tensors, payload, batch, path, args.runs)
                        cell.update(size=size, path=path, payload=payload, batch=batch)
                        if path == "cuda_ipc":
                            check_cuda_ipc_used(cell)
                        cells.append(cell)
                        print(row(cell), flush=True)
    finally:
        for stack in stacks.values():
            stack.close()


# ---- Matrix-Game-2 --------------------------------------------------------------------------------------------------

def run_mg2(args: argparse.Namespace, record: dict) -> None:
    from PIL import Image

    from worldstream.engine.conditioning import MASK_CHANNELS, preprocess_image
    from worldstream.engine.encoder import EncoderModels
    from worldstream.models.wan_vae import VAEEncodeStream

    cfg = load_config(args.mg2_config, args.overrides)
    models = EncoderModels.build(cfg)
    models.warm_up(args.mg2_warmup_blocks)  # as the service before SERVING: lazy set-up, the shared steady block
    timer = synchronized_timer(models.device)
    image = Image.fromarray(synthetic_clip(1, models.height, models.width)[0])
    blocks, per_block = args.blocks, models.frames_per_block
    print(f"# Matrix-Game-2 cond_concat | {args.mg2_config} {' '.join(args.overrides)} | {record['machine']} | commit "
          f"{record['commit']} | {record['date']} | {blocks} blocks of {per_block} latent frames")

    def streamed() -> tuple[list[torch.Tensor], dict]:
        """The encoder service's way: CLIP, then one block at a time, each sent as soon as it is encoded."""
        started = timer()
        session = models.open_session(image)
        out, first, wire_bytes = [], math.nan, 0
        for _ in range(blocks):
            block, size = wire_transport({"cond_concat": session.next_block()})
            out.append(block["cond_concat"])
            wire_bytes += size
            first = first if not math.isnan(first) else timer() - started
        session.close()
        return out, {"first_block_ms": first * 1000, "all_blocks_ms": (timer() - started) * 1000,
                     "bytes_per_block": wire_bytes / blocks}

    @torch.inference_mode()
    def batched() -> tuple[torch.Tensor, dict]:
        """The reference's way: CLIP, then the whole padded video [image, 4 (T - 1) zero frames] in one encode,
        sent as one tensor before the first frame."""
        started = timer()
        pixels = preprocess_image(image, models.height, models.width).to(models.device, models.dtype)
        models.clip.encode_video(pixels[:, :, None])
        zeros = pixels.new_zeros(1, 3, 4 * (blocks * per_block - 1), *pixels.shape[2:])
        latents = VAEEncodeStream(models.vae).encode(torch.cat([pixels[:, :, None], zeros], dim=2))
        mask = torch.zeros_like(latents[:, :MASK_CHANNELS])
        mask[:, :, 0] = 1.0
        received, size = wire_transport({"cond_concat": torch.cat([mask, latents], 1)})
        elapsed = (timer() - started) * 1000
        return received["cond_concat"], {"first_block_ms": elapsed, "all_blocks_ms": elapsed,
                                         "bytes_per_block": size / blocks}

    results = record["mg2"]
    for name, way in (("streamed", streamed), ("batched", batched)):
        reset_peak_rss([os.getpid()])
        results[f"{name}_tensors"], results[name] = way()
        results[name]["rss_mib"] = {"process": peak_rss_mib(os.getpid())}
    # The same latents both ways: the ways differ in when the blocks arrive, not in what arrives.
    streamed_blocks, whole = results.pop("streamed_tensors"), results.pop("batched_tensors")
    results["max_abs_difference"] = float((torch.cat(streamed_blocks, 2).float() - whole.float()).abs().max())
    if "grpc" in args.paths:
        results["streamed_grpc"] = asyncio.run(mg2_over_grpc(args, models, image, blocks))
    for name, key in (("streamed, one process", "streamed"), ("batched (reference)", "batched"),
                      ("streamed over gRPC", "streamed_grpc")):
        if key in results:
            result = results[key]
            print(f"{name:>22s}: first block {result['first_block_ms']:8.1f} ms | all {blocks} blocks "
                  f"{result['all_blocks_ms']:8.1f} ms | {result['bytes_per_block'] / 2**20:.3f} MiB per block | "
                  f"peak RSS {' + '.join(f'{v:.0f}' for v in result['rss_mib'].values())} MiB")
    print(f"streamed == batched: max |difference| {results['max_abs_difference']:.3g}")


async def mg2_over_grpc(args: argparse.Namespace, models, image, blocks: int) -> dict:
    """One Encode stream from the real encoder service, opened as a decoder session opens it."""
    from worldstream.encoder.client import ConditionSpec, EncoderClient
    from worldstream.serving.metrics import ServiceMetrics

    session = models.open_session(image)
    spec = ConditionSpec(models.dtype, {"visual_context": tuple(session.visual_context.shape),
                                        "cond_concat": tuple(session.next_block().shape)})
    session.close()
    png = io.BytesIO()
    image.save(png, format="PNG")
    stack = ServiceStack(args.mg2_config, args.log_dir, args.overrides, startup_timeout=900,
                         encoder_args=["--warmup-blocks", str(args.mg2_warmup_blocks)])
    try:
        stack.start_encoder()
        reset_peak_rss([os.getpid(), stack.encoder.process.pid])
        client = EncoderClient(stack.encoder_address, ServiceMetrics("bench"), window=2)
        started = time.perf_counter()
        feed = await client.open("bench", models.mode, png.getvalue(), models.height, models.width, blocks, spec)
        try:
            await feed.context()
            await feed.block(0)
            first = time.perf_counter() - started
            for b in range(1, blocks):
                await feed.block(b)
            total = time.perf_counter() - started
        finally:
            feed.close()
            await client.close()
        _, block_bytes = wire_transport({"cond_concat": torch.zeros(spec.shapes["cond_concat"], dtype=spec.dtype)})
        return {"first_block_ms": first * 1000, "all_blocks_ms": total * 1000, "bytes_per_block": block_bytes,
                "rss_mib": {"client": peak_rss_mib(os.getpid()), "encoder": peak_rss_mib(stack.encoder.process.pid)}}
    finally:
        stack.close()


# ---- main ----------------------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="eden/interpolate", help="EDEN config (default eden/interpolate)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--sizes", nargs="+", default=FULL_SIZES, metavar="HxW")
    parser.add_argument("--video", type=Path, help="use the first --frames frames of this video instead")
    parser.add_argument("--frames", type=int, default=48)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8, 16], metavar="K")
    parser.add_argument("--payloads", nargs="+", choices=PAYLOADS, default=list(PAYLOADS))
    parser.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS))
    parser.add_argument("--runs", type=int, default=5, help="runs per cell (first-frame percentiles over them)")
    parser.add_argument("--quick", action="store_true", help="tiny config, one small size, a short clip, K 1 and 4")
    parser.add_argument("--mg2", action="store_true", help="Matrix-Game-2's cond_concat instead of EDEN")
    parser.add_argument("--mg2-config", default="mg2/universal")
    parser.add_argument("--blocks", type=int, default=50, help="--mg2: blocks of the session")
    parser.add_argument("--mg2-warmup-blocks", type=int, default=2,
                        help="--mg2: the encoder's warm-up before measuring, in this process and in the service")
    parser.add_argument("--threads", type=int, help="CPU threads of every process (torch intra-op, OMP_NUM_THREADS); "
                                                     "on a busy CPU more threads than idle cores make every cell slow")
    parser.add_argument("--log-dir", type=Path, default=Path("out/transfer-bench"), help="service logs")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--plot", type=Path)
    args = parser.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    if args.frames < 2:
        parser.error("--frames must be at least 2")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the services are started with this environment
        torch.set_num_threads(args.threads)
    record = {"commit": git_commit(), "date": time.strftime("%Y-%m-%d"), "machine": machine(),
              "torch": torch.__version__, "config": args.mg2_config if args.mg2 else args.config,
              "overrides": args.overrides, "frames": args.frames, "runs": args.runs, "threads": torch.get_num_threads(),
              "cells": [], "mg2": {}}
    started = time.perf_counter()
    if args.mg2:
        run_mg2(args, record)
    else:
        run_eden(args, record)
        if args.plot:
            plot(record["cells"], args.plot, f"EDEN transfer, {args.config}\n{record['machine']}, {record['date']}, "
                                             f"commit {record['commit']}")
    record["seconds"] = time.perf_counter() - started
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=1))
    print(f"# {record['seconds']:.1f} s")


if __name__ == "__main__":
    main()
