"""One DiT forward at real scale on one GPU: seconds per forward, TFLOP/s, MFU, peak memory.

One command per figure (docs/benchmarks.md), e.g.::

    python bench/dit_forward.py --model t2v_14b --size 480*832 --frames 81 --compile
    python bench/dit_forward.py --model s2v_14b --size 704*1024 --frames 80 --compile

Weights are random (``RandomWeights``, drawn on the GPU, bf16), so no checkpoint is needed.
The time is the median of ``--repeat`` forwards after ``--warmup`` ones; with ``--compile``
the first warm-up forward includes compilation and is reported separately as compile time.
``--floor`` also measures the GEMM and attention rates at this shape and prints the time a
forward would take if every FLOP ran at those rates (the floor, docs/facts.md §M, the first number).
``--profile`` prints where the device time of one forward goes (GEMM / attention / other).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from benchlib import event_time, header, load_model_config, median, timed_runs
from wan_exp.geometry import AUDIO_TOKENS_PER_FRAME
from wan_exp.metrics.flops import dit_forward_flops, mfu, peak_flops
from wan_exp.models import attention as attn_backend
from wan_exp.models.checkpoint import RandomWeights, load_into
from wan_exp.models.wan_s2v import WanModel, apply_compile
from wan_exp.units import GIB

VAE_STRIDE = 8  # pixels per latent pixel
TEMPORAL_STRIDE = 4  # video frames per latent frame


def latent_frames(cfg, frames: int) -> int:
    """T2V counts the first frame on its own (81 -> 21); S2V clips are 4 frames a latent (80 -> 20)."""
    return frames // TEMPORAL_STRIDE if cfg.s2v else (frames - 1) // TEMPORAL_STRIDE + 1


def make_inputs(cfg, height: int, width: int, frames: int, device: torch.device) -> dict:
    """Random inputs of one clip (never zeros: docs/facts.md §M)."""
    lat_f, lat_h, lat_w = latent_frames(cfg, frames), height // VAE_STRIDE, width // VAE_STRIDE
    gen = torch.Generator(device).manual_seed(0)

    def randn(*shape):
        return torch.randn(shape, generator=gen, device=device, dtype=torch.bfloat16)

    inputs = {
        "noisy": randn(1, cfg.in_dim, lat_f, lat_h, lat_w),
        "timestep": torch.tensor([500.0], device=device),
        "context": randn(1, cfg.text_len, cfg.text_dim),
    }
    if cfg.s2v:
        inputs["audio"] = randn(1, cfg.audio_layers, TEMPORAL_STRIDE * lat_f, cfg.audio_dim)
        inputs["ref"] = randn(1, cfg.in_dim, 1, lat_h, lat_w)
        inputs["motion"] = randn(1, cfg.in_dim, cfg.motion_frames, lat_h, lat_w)
    return inputs


def token_counts(model: WanModel, inputs: dict) -> tuple[int, int]:
    """(all tokens of the sequence, noisy tokens), read off the model's own embedding."""
    with torch.inference_mode():
        x, _, _, n_noisy = model._embed(inputs["noisy"], inputs.get("ref"), inputs.get("motion"), None)
    return x.shape[1], n_noisy


def forward_flops(cfg, n_tokens: int, n_noisy: int, lat_f: int) -> float:
    if not cfg.s2v:
        return dit_forward_flops(cfg, n_tokens)
    per_query = AUDIO_TOKENS_PER_FRAME + 1  # a frame's local tokens + its padding token
    return dit_forward_flops(
        cfg, n_tokens, audio_query_tokens=n_noisy, audio_tokens=lat_f * per_query, audio_tokens_per_query=per_query
    )


# ------------------------------------------------------------------ floor (docs/facts.md §M)
def floor_seconds(cfg, n_tokens: int, device: torch.device) -> dict:
    """Measured rates of this forward's GEMMs and self-attention, and the time every FLOP of
    the trunk would take at them (text cross-attention counted at the GEMM rate)."""
    d, f, m, layers = cfg.dim, cfg.ffn_dim, cfg.text_len, cfg.num_layers
    x = torch.randn(n_tokens, d, device=device, dtype=torch.bfloat16)
    h = torch.randn(n_tokens, f, device=device, dtype=torch.bfloat16)
    rates = {}
    for name, inp, out_features in (("linear_d_d", x, d), ("linear_d_ffn", x, f), ("linear_ffn_d", h, d)):
        w = torch.randn(out_features, inp.shape[1], device=device, dtype=torch.bfloat16) * 0.02
        b = torch.randn(out_features, device=device, dtype=torch.bfloat16)
        seconds = event_time(lambda: F.linear(inp, w, b))
        rates[name] = 2 * n_tokens * inp.shape[1] * out_features / seconds
    heads = cfg.num_heads
    q, k, v = (torch.randn(1, n_tokens, heads, d // heads, device=device, dtype=torch.bfloat16) for _ in range(3))
    seconds = event_time(lambda: attn_backend.attention(q, k, v), warmup=1, repeat=5)
    rates["self_attention"] = 4 * n_tokens * n_tokens * d / seconds
    per_block = (
        12 * n_tokens * d * d / rates["linear_d_d"]
        + 2 * n_tokens * d * f / rates["linear_d_ffn"]
        + 2 * n_tokens * d * f / rates["linear_ffn_d"]
        + 4 * n_tokens * n_tokens * d / rates["self_attention"]
        + (4 * n_tokens * m * d + 4 * m * d * d) / rates["linear_d_d"]
    )
    return {"floor_s": layers * per_block, **{f"{k}_tflops": r / 1e12 for k, r in rates.items()}}


# ------------------------------------------------------------------ profile
def kernel_class(name: str) -> str:
    lowered = name.lower()
    if lowered.startswith("triton_"):  # inductor's fused elementwise kernels (names list the ops they fuse)
        return "other"
    if any(s in lowered for s in ("fmha", "flash", "attention", "cudnn", "sdpa")):
        return "attention"
    if any(s in lowered for s in ("gemm", "nvjet", "xmma", "cutlass", "matmul", "sm90_")):
        return "gemm"
    return "other"


def profile_forward(run) -> None:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    events = [
        (e.key, e.self_device_time_total / 1e6, e.count) for e in prof.key_averages() if e.self_device_time_total > 0
    ]
    total = sum(t for _, t, _ in events)
    by_class: dict[str, float] = {}
    for name, seconds, _ in events:
        by_class[kernel_class(name)] = by_class.get(kernel_class(name), 0.0) + seconds
    print(
        f"profile: device time {total:.3f} s = "
        + ", ".join(f"{c} {t:.3f} s ({100 * t / total:.0f}%)" for c, t in sorted(by_class.items(), key=lambda i: -i[1]))
    )
    for name, seconds, count in sorted(events, key=lambda e: -e[1])[:25]:
        print(f"  {seconds * 1e3:9.1f} ms {count:6d}x  [{kernel_class(name):9}] {name[:110]}")


# ------------------------------------------------------------------ main
def parse_size(text: str) -> tuple[int, int]:
    try:
        height, width = (int(v) for v in text.replace("x", "*").split("*"))
    except ValueError:
        raise SystemExit(f"--size {text!r}: expected HEIGHT*WIDTH in pixels, e.g. 480*832") from None
    if height % 16 or width % 16:
        raise SystemExit(f"--size {text!r}: height and width must be multiples of 16 (VAE 8 x patch 2)")
    return height, width


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="t2v_14b", help="conf/model/<name>.yaml (t2v_14b, s2v_14b, ...)")
    parser.add_argument("--size", default="480*832", help="HEIGHT*WIDTH in pixels")
    parser.add_argument("--frames", type=int, default=None, help="video frames (default: 81 T2V, 80 S2V)")
    parser.add_argument("--compile", action="store_true", help="model.compile=true (torch.compile per block)")
    parser.add_argument("--backend", default="auto", help="model.attention_backend")
    parser.add_argument("--layers", type=int, default=None, help="fewer blocks (quick checks only)")
    parser.add_argument("--warmup", type=int, default=None, help="default 1, or 2 with --compile")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--floor", action="store_true", help="measure GEMM/attention rates and the floor")
    parser.add_argument("--profile", action="store_true", help="kernel time breakdown of one forward")
    parser.add_argument("--json", type=Path, default=None, help="append the result as one JSON line here")
    args = parser.parse_args()

    height, width = parse_size(args.size)
    overrides = {"attention_backend": args.backend, "compile": args.compile}
    if args.layers:
        overrides["num_layers"] = args.layers
    cfg = load_model_config(args.model, **overrides)
    frames = args.frames or (80 if cfg.s2v else 81)
    device = torch.device("cuda")
    torch.manual_seed(0)

    attn_backend.configure(cfg.attention_backend)
    with torch.device("meta"):
        model = WanModel(cfg)
    apply_compile(model, cfg)
    load_into(model, RandomWeights(cfg, cfg.seed), torch.bfloat16, device)
    model.eval()
    weights_gib = torch.cuda.memory_allocated() / GIB
    inputs = make_inputs(cfg, height, width, frames, device)
    n_tokens, n_noisy = token_counts(model, inputs)
    lat_f = latent_frames(cfg, frames)
    flops = forward_flops(cfg, n_tokens, n_noisy, lat_f)

    def run():
        with torch.inference_mode():
            return model(**inputs)

    torch.cuda.reset_peak_memory_stats()
    warmup = args.warmup if args.warmup is not None else (2 if args.compile else 1)
    warm, measured = timed_runs(run, warmup, args.repeat)
    out = run()
    finite = bool(torch.isfinite(out).all())
    seconds = median(measured)
    peak = peak_flops(torch.cuda.get_device_name(), "bf16")
    result = {
        "model": args.model,
        "size": f"{height}*{width}",
        "frames": frames,
        "latent_shape": list(inputs["noisy"].shape),
        "tokens": n_tokens,
        "noisy_tokens": n_noisy,
        "layers": cfg.num_layers,
        "compile": args.compile,
        "attention_backend": attn_backend.selected_backend(),
        "s_per_forward": seconds,
        "s_all": measured,
        "warmup_s": warm,
        "compile_s": (warm[0] - seconds) if args.compile else None,
        "tflop_per_forward": flops / 1e12,
        "tflops": flops / seconds / 1e12,
        "mfu": mfu(flops, seconds, 1, peak),
        "weights_gib": weights_gib,
        "peak_allocated_gib": torch.cuda.max_memory_allocated() / GIB,
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / GIB,
        "output_finite": finite,
    }
    result["peak_over_weights_gib"] = result["peak_allocated_gib"] - weights_gib
    if args.floor:
        result.update(floor_seconds(cfg, n_tokens, device))
    info = header(**{k: result[k] for k in ("model", "size", "frames", "tokens", "attention_backend", "compile")})
    for key in (
        "s_per_forward",
        "s_all",
        "warmup_s",
        "compile_s",
        "tflop_per_forward",
        "tflops",
        "mfu",
        "weights_gib",
        "peak_allocated_gib",
        "peak_reserved_gib",
        "peak_over_weights_gib",
        "output_finite",
        "floor_s",
        "linear_d_d_tflops",
        "linear_d_ffn_tflops",
        "linear_ffn_d_tflops",
        "self_attention_tflops",
    ):
        if key in result:
            value = result[key]
            text = (
                f"{value:.4g}"
                if isinstance(value, float)
                else ("[" + ", ".join(f"{v:.3f}" for v in value) + "]" if isinstance(value, list) else str(value))
            )
            print(f"{key:>22}: {text}")
    if not finite:
        print("WARNING: the output has non-finite values")
    if args.profile:
        profile_forward(run)
    if args.json:
        with args.json.open("a") as fh:
            fh.write(json.dumps({**info, **result}) + "\n")
    mfu_text = "n/a" if result["mfu"] is None else f"{100 * result['mfu']:.1f}%"
    print(
        f"RESULT {args.model} {height}x{width}x{frames} tokens={n_tokens} compile={args.compile} "
        f"{seconds:.3f} s/forward {result['tflops']:.0f} TFLOP/s MFU {mfu_text} "
        f"peak {result['peak_allocated_gib']:.1f} GiB (weights {weights_gib:.1f}) on {info['device']}"
    )


if __name__ == "__main__":
    main()
