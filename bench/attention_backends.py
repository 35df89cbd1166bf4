"""Attention backends at the Wan 14B self-attention shapes on one GPU (forward, bf16).

    python bench/attention_backends.py                      # N = 32760, 35100, 75600
    python bench/attention_backends.py --tokens 32760 63360

Every backend runs through the model's own entry point (``wan_exp.models.attention``) with
q, k, v in the model's layout, (B, N, H, d) = (1, N, 40, 128), so the figures include any
copy a backend needs for that layout; ``--heads-first`` adds rows with each head's tokens
contiguous in memory, (B, H, N, d) viewed as (B, N, H, d), to show what the layout costs. TFLOP/s counts
4·N²·H·d per forward. Each backend's
output is compared with the first backend that ran (relative L2 error), so a fast wrong
kernel shows. flash-attn 2/3/4 rows appear when their modules import; otherwise the row
says why it was not measured.
"""

from __future__ import annotations

import argparse

import torch

from benchlib import event_time, header
from wan_exp.models import attention as attn_backend

WAN_HEADS, WAN_HEAD_DIM = 40, 128
DEFAULT_TOKENS = (32760, 35100, 75600)  # T2V 480p, S2V 480p, T2V 720p
BACKENDS = ("sdpa_cudnn", "sdpa_flash", "sdpa_efficient", "flash_attn", "fa3", "fa4")
NOT_INSTALLABLE = {  # why a flash-attn flavour is absent on the lent machine (docs/benchmarks.md)
    "flash_attn": "flash-attn 2 is an sdist that compiles CUDA for a long time; no wheel carried",
    "fa3": "flash-attn 3 (flash_attn_interface) has no wheel on the registry",
    "fa4": "flash-attn 4 not installed: carry it in two calls with bench/fa4_carry.sh",
}


def measure(backend: str, q, k, v) -> tuple[float, torch.Tensor]:
    attn_backend.configure(backend)
    seconds = event_time(lambda: attn_backend.attention(q, k, v), warmup=2, repeat=5)
    return seconds, attn_backend.attention(q, k, v)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=list(DEFAULT_TOKENS))
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS))
    parser.add_argument("--heads-first", action="store_true", help="also time (B, H, N, d) memory layout")
    args = parser.parse_args()
    layouts = ("tokens-first", "heads-first") if args.heads_first else ("tokens-first",)
    header(shape=f"(1, N, {WAN_HEADS}, {WAN_HEAD_DIM}) bf16, forward")
    importable = attn_backend.importable_backends()
    rows = []
    for n in args.tokens:
        gen = torch.Generator("cuda").manual_seed(n)
        q, k, v = (
            torch.randn(1, n, WAN_HEADS, WAN_HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=gen)
            for _ in range(3)
        )
        flops = 4 * n * n * WAN_HEADS * WAN_HEAD_DIM
        reference = None
        for layout in layouts:
            if layout == "heads-first":  # same values, (B, H, N, d) in memory
                q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
            for backend in args.backends:
                name = backend if layout == "tokens-first" else f"{backend} (B,H,N,d)"
                if backend in NOT_INSTALLABLE and not importable.get(backend, False):
                    if layout == "tokens-first":
                        rows.append((n, name, None, None, f"not measured: {NOT_INSTALLABLE[backend]}"))
                    continue
                try:
                    seconds, out = measure(backend, q, k, v)
                except Exception as err:  # noqa: BLE001 - a backend that cannot run here is a row, not a crash
                    rows.append((n, name, None, None, f"failed: {type(err).__name__}: {str(err).splitlines()[0][:90]}"))
                    continue
                if reference is None:
                    reference, error = out.float(), 0.0
                else:
                    error = float((out.float() - reference).norm() / reference.norm())
                rows.append((n, name, seconds, flops / seconds / 1e12, f"rel. L2 vs first {error:.1e}"))
                del out
        del q, k, v, reference
        torch.cuda.empty_cache()
    print(f"{'tokens':>7} {'backend':<24} {'ms':>8} {'TFLOP/s':>8}  note")
    for n, backend, seconds, tflops, note in rows:
        ms = f"{seconds * 1e3:8.1f}" if seconds else f"{'-':>8}"
        rate = f"{tflops:8.0f}" if tflops else f"{'-':>8}"
        print(f"{n:>7} {backend:<24} {ms} {rate}  {note}")


if __name__ == "__main__":
    main()
