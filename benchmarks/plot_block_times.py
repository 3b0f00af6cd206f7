"""Plot block times over a run from the JSON files of `block_loop.py --json` and `services.py --json`.

    python benchmarks/plot_block_times.py out/engine.json out/services.json --out docs/block_times.png \
        [--label "engine" --label "services"]

Engine files: the wall time of each block of every run. Services files: the client's interval between
consecutive blocks of every single-session run (the time a block takes as the user sees it).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def series(record: dict) -> tuple[str, list[list[float]]]:
    """(label, per-run block times in ms, indexed from block 1) of one benchmark record."""
    overrides = " ".join(o for o in record["overrides"] if not o.startswith("init_seed"))
    if "with_encoder" in record:  # block_loop.py
        label = f"engine{' + encoder' if record['with_encoder'] else ''} {overrides}".strip()
        return label, [[row["block"] * 1000 for row in run[1:]] for run in record["runs"]]
    return f"services, client interval {overrides}".strip(), [[t * 1000 for t in run["intervals"]]
                                                            for run in record["runs"]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, default=Path("out/block_times.png"))
    parser.add_argument("--label", action="append", default=[], help="legend of each file, in order")
    args = parser.parse_args()
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for n, (path, color) in enumerate(zip(args.files, plt.rcParams["axes.prop_cycle"].by_key()["color"])):
        label, runs = series(json.loads(path.read_text()))
        label = args.label[n] if n < len(args.label) else label
        for i, times in enumerate(runs):
            ax.plot(range(1, len(times) + 1), times, color=color, alpha=0.8, lw=1.2, label=label if i == 0 else None)
    ax.set_xlabel("block")
    ax.set_ylabel("ms per block (12 frames)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
