"""What merging key splits inside thread-block clusters costs on this GPU (bench/cluster_probe.cu).

    python3 -m bench.cluster_probe build DIR    (here: nvcc)
    python3 -m bench.cluster_probe run DIR      (on the GPU)

A benchmark, not a test: it prints how many clusters of full-SM blocks (the MLA split blocks'
shape) can be resident at once, and the time of a launch that merges 8 splits in a cluster of 8
(through distributed shared memory or L2) or 2 splits in a pair (by loads from the peer or one
bulk copy), each against the same blocks with no exchange. The probe exits non-zero when two
ways of one merge disagree.
"""

from __future__ import annotations

import argparse
import subprocess
from pathlib import Path

SOURCE = Path(__file__).with_suffix(".cu")
KERNELS = Path(__file__).resolve().parents[1] / "kernels" / "cuda"  # the cluster primitives
BINARY = "cluster_probe"


def build(out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    binary = out / BINARY
    cmd = [
        "nvcc",
        "-O3",
        "-std=c++17",
        "-arch=sm_90a",
        f"-I{KERNELS}",
        "-o",
        str(binary),
        str(SOURCE),
    ]
    subprocess.run(cmd, check=True)
    return binary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["build", "run"])
    parser.add_argument("dir", type=Path)
    args = parser.parse_args()
    if args.action == "build":
        print(build(args.dir))
    else:
        raise SystemExit(subprocess.run([str(args.dir / BINARY)]).returncode)


if __name__ == "__main__":
    main()
