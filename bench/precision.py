"""Seconds per DiT forward and drift against bf16, for each model.precision, on one GPU.

    python bench/precision.py                                   # s2v_14b, 480*832 and 704*1024, all
    python bench/precision.py --sizes 480*832 --precisions bf16,fp8 --compile

Weights are random (bf16, ``RandomWeights``) and the inputs those of bench/dit_forward.py. The
bf16 model is built once and kept as the reference; each other precision runs on a copy of it
(``reference_copy``) with ``apply_precision`` applied, so every figure compares the same
weights and inputs. Per precision and size: the median seconds of ``--repeat`` forwards after
the warm-up, the speed-up over bf16, the flow's relative L2 against the bf16 forward (the
14B goal: <= 3e-2), and the kernels that ran (attention, 8-bit attention, FP8 linears). One
JSON line per figure goes to ``--json``. Needs the GPU extra (``pip install -e ".[gpu]"``); the
flow's relative L2 needs no torchmetrics (wan_exp.metrics.drift imports it only for the frames'
PSNR and SSIM). A precision whose kernels are missing is reported as not run, and the others go on.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from benchlib import header, load_model_config, median, timed_runs
from dit_forward import make_inputs, parse_size, token_counts
from wan_exp.metrics.drift import relative_l2
from wan_exp.models import attention
from wan_exp.models.checkpoint import RandomWeights, load_into
from wan_exp.models.precision import apply_precision, reference_copy
from wan_exp.models.wan_s2v import WanModel
from wan_exp.precision_support import NEEDS
from wan_exp.units import GIB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="s2v_14b", help="conf/model/<name>.yaml")
    parser.add_argument("--sizes", default="480*832,704*1024", help="HEIGHT*WIDTH, comma separated")
    parser.add_argument("--frames", type=int, default=80, help="video frames per clip")
    parser.add_argument("--precisions", default=",".join(NEEDS), help="model.precision values, comma separated")
    parser.add_argument("--compile", action="store_true", help="torch.compile per block (as model.compile=true)")
    parser.add_argument("--layers", type=int, default=None, help="fewer blocks (quick checks only)")
    parser.add_argument("--warmup", type=int, default=None, help="default 1, or 2 with --compile")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None, help="append one JSON line per figure here")
    args = parser.parse_args()

    precisions = args.precisions.split(",")
    unknown = [p for p in precisions if p not in NEEDS]
    if unknown:
        raise SystemExit(f"--precisions: {unknown} unknown; choose from {', '.join(NEEDS)}")
    overrides = {"compile": args.compile, **({"num_layers": args.layers} if args.layers else {})}
    cfg = load_model_config(args.model, **overrides)
    info = header(model=args.model, frames=args.frames, compile=args.compile, layers=cfg.num_layers)
    device = torch.device("cuda")
    with torch.device("meta"):
        base = WanModel(cfg)
    load_into(base, RandomWeights(cfg, cfg.seed), torch.bfloat16, device)
    base.eval()
    warmup = args.warmup if args.warmup is not None else (2 if args.compile else 1)

    rows = []
    for size in args.sizes.split(","):
        height, width = parse_size(size)
        inputs = make_inputs(cfg, height, width, args.frames, device)
        tokens, _ = token_counts(base, inputs)
        attention.configure_attention_bits(None)
        with torch.inference_mode():
            reference_flow = base(**inputs).float()
        bf16_seconds = None
        for precision in precisions:
            model = base if precision == "bf16" else reference_copy(base)
            try:
                applied = apply_precision(model, precision, device)
            except Exception as err:  # noqa: BLE001 - a precision this machine cannot run: say so, go on
                print(f"{size} {precision}: not run: {type(err).__name__}: {err}")
                continue

            def run(model=model, inputs=inputs):
                with torch.inference_mode():
                    return model(**inputs)

            torch.cuda.reset_peak_memory_stats()
            try:
                _, measured = timed_runs(run, warmup, args.repeat)
            except Exception as err:  # noqa: BLE001 - e.g. no 8-bit kernel ran at this head dim
                print(f"{size} {precision}: failed: {type(err).__name__}: {str(err).splitlines()[0]}")
                continue
            seconds = median(measured)
            bf16_seconds = seconds if precision == "bf16" else bf16_seconds
            row = {
                **info,
                "size": size,
                "tokens": tokens,
                "precision": precision,
                "s_per_forward": seconds,
                "s_all": measured,
                "speedup_over_bf16": bf16_seconds / seconds if bf16_seconds else None,
                "flow_rel_l2": relative_l2(run().float(), reference_flow),
                "attention_kernels": attention.backend_report(),
                "fp8_linear_layers": (applied["fp8_linear"] or {}).get("layers"),
                "peak_allocated_gib": torch.cuda.max_memory_allocated() / GIB,
            }
            rows.append(row)
            kernel = row["attention_kernels"].get("selected_8bit") or row["attention_kernels"]["selected"]
            speedup = f"{row['speedup_over_bf16']:.2f}x" if row["speedup_over_bf16"] else "—"
            print(
                f"{size:>9} {precision:>15}: {seconds:7.3f} s/forward  {speedup:>6}  flow rel L2 "
                f"{row['flow_rel_l2']:.2e}  attention {kernel}  fp8 linears {row['fp8_linear_layers'] or 0}"
            )
            if args.json:
                with args.json.open("a") as out:
                    out.write(json.dumps(row) + "\n")
            if model is not base:
                del model
                torch.cuda.empty_cache()
        attention.configure_attention_bits(None)


if __name__ == "__main__":
    main()
