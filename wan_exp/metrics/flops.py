"""FLOPs of one DiT forward, the table of device peaks, and MFU (docs/facts.md §8).

Only the DiT trunk (plus the S2V audio cross-attention) is counted: the text and audio
encoders, the patch embedding and the head are a small fraction of the work, and the
public reference figures (docs/facts.md §6, "trunk MFU") count the same way. A multiply-add
is two FLOPs. The full token sequence is counted once, however many ranks share it.
"""

from __future__ import annotations

from typing import Any, Optional

# Dense (no structured sparsity) bf16/fp16 tensor-core peak, FLOP/s, per GPU.
# Keys are matched as lower-case substrings of torch.cuda.get_device_name(); the first
# match wins, so the more specific names come first.
DEVICE_PEAKS: dict[str, float] = {
    # NVIDIA H100 datasheet: SXM 989.4 TFLOPS bf16 dense (1,979 with sparsity).
    "h100 nvl": 835e12,  # H100 NVL datasheet, per GPU: 835 dense (1,671 sparse)
    "h100 pcie": 756e12,  # H100 PCIe datasheet: 756 dense (1,513 sparse)
    "h100": 989e12,  # H100 SXM5 80GB HBM3 ("NVIDIA H100 80GB HBM3")
    "gh200": 989e12,  # GH200 datasheet: 989 dense bf16 for the Hopper GPU
    # H200 datasheet: same Hopper SXM core as H100 SXM, 989 dense (1,979 sparse).
    "h200": 989e12,
    # B200 datasheet (HGX B200, per GPU): 2.25 PFLOPS dense fp16/bf16 (4.5 sparse).
    "b200": 2250e12,
    # A100 datasheet: 312 TFLOPS bf16 dense (624 sparse), SXM and PCIe alike.
    "a100": 312e12,
    # A10G (AWS g5; no public datasheet, about 70 dense by its clocks); A10 datasheet:
    # 125 dense (250 sparse).
    "a10g": 70e12,
    "a10": 125e12,
    # L40S datasheet: 362.05 TFLOPS bf16 dense (733 sparse).
    "l40s": 362e12,
    # L40 datasheet: 181 dense (362 sparse).
    "l40": 181e12,
    # L4 datasheet: 121 dense (242 sparse).
    "l4": 121e12,
    # RTX 6000 Ada datasheet: 364.2 sparse -> 182 dense bf16 with fp32 accumulate.
    "rtx 6000 ada": 182e12,
    # GeForce RTX 4090 (Ada whitepaper, appendix): bf16 with fp32 accumulate, which is
    # what PyTorch's matmuls use, 82.6 dense (165.2 sparse); 165.2 only with fp16 accumulate.
    "rtx 4090": 82.6e12,
    # GeForce RTX 3090 (GA102 whitepaper): bf16 with fp32 accumulate 71 dense (142 sparse).
    "rtx 3090": 71e12,
    # V100 has no bf16; fp16 tensor peak (SXM2) 125 TFLOPS.
    "v100": 125e12,
}

# dtypes whose matmuls run on the bf16/fp16 tensor cores the table describes.
_TENSOR_CORE_DTYPES = {"bf16", "fp16", "bfloat16", "float16"}


def peak_flops(device_name: str, dtype: str = "bf16") -> Optional[float]:
    """Dense peak FLOP/s of one device for ``dtype``, or None when unknown (CPU, a GPU
    missing from DEVICE_PEAKS, or an fp32 model, for which the bf16 peak would mislead)."""
    if str(dtype).split(".")[-1].lower() not in _TENSOR_CORE_DTYPES:
        return None
    name = device_name.lower()
    for key, peak in DEVICE_PEAKS.items():
        if key in name:
            return peak
    return None


def mfu(flops: float, seconds: float, n_gpus: int, peak: Optional[float]) -> Optional[float]:
    """Model FLOPs utilisation: FLOPs / (time x GPUs x peak); None without a peak."""
    if peak is None or not seconds or not flops:
        return None
    return flops / (seconds * n_gpus * peak)


def dit_forward_flops(
    model_cfg: Any,
    n_tokens: int,
    n_text: Optional[int] = None,
    audio_query_tokens: int = 0,
    audio_tokens: int = 0,
    audio_tokens_per_query: int = 0,
) -> float:
    """FLOPs of one DiT forward over the whole (unsharded) sequence.

    Trunk, per block (N video tokens, D dim, F ffn dim, M text tokens):
    12·N·D² (self-attention q,k,v,o and cross-attention q,o) + 4·N·D·F (FFN)
    + 4·N²·D (self-attention scores and values) + 4·N·M·D (cross-attention scores and
    values) + 4·M·D² (cross-attention k,v over the text).

    S2V audio cross-attention, at each of ``model.audio_inject_layers``:
    4·Nq·D² (q,o over the ``audio_query_tokens`` video tokens that attend to audio)
    + 4·A·D² (k,v over all ``audio_tokens``) + 4·Nq·a·D (scores and values, each query
    sees ``audio_tokens_per_query`` audio tokens: those of its own frame).
    """
    d, f, layers = model_cfg.dim, model_cfg.ffn_dim, model_cfg.num_layers
    n = n_tokens
    m = model_cfg.text_len if n_text is None else n_text
    per_block = 12 * n * d * d + 4 * n * d * f + 4 * n * n * d + 4 * n * m * d + 4 * m * d * d
    total = layers * per_block
    if model_cfg.s2v and audio_query_tokens:
        injected = len(model_cfg.audio_inject_layers)
        per_injection = (
            4 * audio_query_tokens * d * d
            + 4 * audio_tokens * d * d
            + 4 * audio_query_tokens * audio_tokens_per_query * d
        )
        total += injected * per_injection
    return float(total)
