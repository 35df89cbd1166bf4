"""Resident high-water mark of one CPU ``F.scaled_dot_product_attention`` call, fused path against
math path: 4-D contiguous (batch, heads, positions, channels) against the same call in 3-D.

Each case runs in a fresh process (``ru_maxrss`` only rises): the figure is the high-water mark
after the call minus the one before it, the inputs already made and the kernels warmed up on a
tiny call of the same layout. Usage:
``python bench/sdpa_cpu_memory.py [positions] [channels]`` (defaults 3840 and 8, fp32)."""

from __future__ import annotations

import subprocess
import sys

CASES = {
    "4-D contiguous (fused flash path)": "q = torch.randn(1, 1, P, C)",
    "3-D (math path)": "q = torch.randn(1, P, C)",
}


def measure(setup: str, positions: int, channels: int) -> float:
    """MiB the call raised the process's resident high-water mark by (Linux: ru_maxrss in KiB)."""
    code = (
        "import resource, torch, torch.nn.functional as F\n"
        f"P, C = 16, 2\n{setup}\nF.scaled_dot_product_attention(q, q, q)\n"  # load the kernels
        f"P, C = {positions}, {channels}\n{setup}\nk, v = q.clone(), q.clone()\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "F.scaled_dot_product_attention(q, k, v)\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)\n"
    )
    return float(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout)


def main() -> None:
    positions = int(sys.argv[1]) if len(sys.argv) > 1 else 3840
    channels = int(sys.argv[2]) if len(sys.argv) > 2 else 8
    print(f"positions {positions}, channels {channels}, fp32; scores matrix {positions**2 * 4 / 2**20:.1f} MiB")
    for name, setup in CASES.items():
        print(f"{name}: high-water mark +{measure(setup, positions, channels):.1f} MiB")


if __name__ == "__main__":
    main()
