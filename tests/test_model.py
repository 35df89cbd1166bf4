"""WanModel: the tiny S2V forward against a plain per-op fp64 reference written here (it shares
no code with the model), RoPE against the complex-number formula, the modulation chunk order,
the sequence-sharding hooks, and the 14B configs' key sets, shapes and parameter counts."""

from __future__ import annotations

import math
import threading
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from tolerance import attention_reductions, chain_close_kwargs, dit_reductions, reordered_sum_tolerance
from wan_exp.config import ModelConfig
from wan_exp.geometry import sequence_length
from wan_exp.models import attention as attn_backend
from wan_exp.models.wan_s2v import (
    WanModel,
    apply_compile,
    apply_rope,
    inject_audio,
    rope_angles,
    rope_pairs,
)

CONF = Path(__file__).resolve().parents[1] / "conf" / "model"


def model_cfg(name: str):
    return OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(CONF / f"{name}.yaml"))


# ============================================================================ plain reference
def lin(sd, name, x):
    return x @ sd[f"{name}.weight"].T + sd[f"{name}.bias"]


def layer_norm(x, eps, weight=None, bias=None):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    y = (x - mean) / torch.sqrt(var + eps)
    return y if weight is None else y * weight + bias


def rms_norm(x, weight, eps):
    return x / torch.sqrt((x**2).mean(-1, keepdim=True) + eps) * weight


def silu(x):
    return x * torch.sigmoid(x)


def gelu_tanh(x):
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def softmax_attention(q, k, v):
    """q (Lq, H, d), k/v (Lk, H, d)."""
    scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(q.shape[-1])
    return torch.einsum("hqk,khd->qhd", torch.softmax(scores, dim=-1), v)


def patches(latents, weight, bias):
    """Non-overlapping patch embedding (a conv with kernel = stride), token order (t, h, w)."""
    _, kt, kh, kw = weight.shape[1:]
    _, t, h, w = latents.shape
    tokens = []
    for ti in range(t // kt):
        for hi in range(h // kh):
            for wi in range(w // kw):
                patch = latents[:, ti * kt : (ti + 1) * kt, hi * kh : (hi + 1) * kh, wi * kw : (wi + 1) * kw]
                tokens.append(weight.flatten(1) @ patch.flatten() + bias)
    return torch.stack(tokens)


def rope_reference(x, positions, head_dim):
    """The complex-number formula: pair j of an axis with n pairs turns by pos * 10000^(-2j/2n)."""
    n_s = head_dim // 2 // 3
    n_t = head_dim // 2 - 2 * n_s
    angles = []
    for t, h, w in positions:
        row = [t * 10000 ** (-2 * j / (2 * n_t)) for j in range(n_t)]
        row += [h * 10000 ** (-2 * j / (2 * n_s)) for j in range(n_s)]
        row += [w * 10000 ** (-2 * j / (2 * n_s)) for j in range(n_s)]
        angles.append(row)
    rotation = torch.polar(
        torch.ones(len(positions), head_dim // 2, dtype=torch.float64), torch.tensor(angles, dtype=torch.float64)
    )
    xc = torch.view_as_complex(x.to(torch.float64).reshape(*x.shape[:-1], -1, 2).contiguous())
    return torch.view_as_real(xc * rotation[:, None]).flatten(-2)


def causal_conv(x, weight, bias, stride):
    """x (C, T); left padding repeats the first frame."""
    k = weight.shape[-1]
    padded = torch.cat([x[:, :1]] * (k - 1) + [x], dim=1)
    steps = (padded.shape[1] - k) // stride + 1
    return torch.stack(
        [sum(weight[:, :, j] @ padded[:, i * stride + j] for j in range(k)) + bias for i in range(steps)], dim=1
    )


def audio_reference(sd, audio, frames, motion_frames):
    """audio (layers, T, C) -> tokens (F, 5, D), global (F, D)."""
    p = "casual_audio_encoder"
    w = silu(sd[f"{p}.weights"].flatten())
    feat = sum(audio[i] * w[i] for i in range(len(w))) / w.sum()
    feat = feat[: 4 * frames]
    feat = torch.cat([feat[:1]] * (4 * (motion_frames - 1) + 1) + [feat]).T  # (C, T)

    def stack(x):
        for conv, stride in (("conv2", 2), ("conv3", 2)):
            x = silu(layer_norm(x.T, 1e-6)).T
            x = causal_conv(x, sd[f"{p}.encoder.{conv}.conv.weight"], sd[f"{p}.encoder.{conv}.conv.bias"], stride)
        return silu(layer_norm(x.T, 1e-6))  # (T', D)

    local = causal_conv(feat, sd[f"{p}.encoder.conv1_local.conv.weight"], sd[f"{p}.encoder.conv1_local.conv.bias"], 1)
    streams = [stack(s) for s in local.chunk(4, dim=0)]
    pad = sd[f"{p}.encoder.padding_tokens"].flatten()
    tokens = torch.stack([torch.stack([s[t] for s in streams] + [pad]) for t in range(streams[0].shape[0])])
    glob = lin(
        sd,
        f"{p}.encoder.final_linear",
        stack(
            causal_conv(feat, sd[f"{p}.encoder.conv1_global.conv.weight"], sd[f"{p}.encoder.conv1_global.conv.bias"], 1)
        ),
    )
    return tokens[-frames:], glob[-frames:]


def reference_forward(sd, cfg, noisy, timestep, context, audio, ref, motion, pose):
    """One batch element at a time, fp64, per-token modulation written out in full."""
    dim, heads, eps = cfg.dim, cfg.num_heads, cfg.eps
    d = dim // heads
    outs = []
    for b in range(noisy.shape[0]):
        f, h, w = noisy.shape[2], noisy.shape[3] // 2, noisy.shape[4] // 2
        mask = sd["trainable_cond_mask.weight"]
        x_noisy = (
            patches(noisy[b], sd["patch_embedding.weight"], sd["patch_embedding.bias"])
            + patches(pose[b], sd["cond_encoder.weight"], sd["cond_encoder.bias"])
            + mask[0]
        )
        x_ref = patches(ref[b], sd["patch_embedding.weight"], sd["patch_embedding.bias"]) + mask[1]
        m = motion[b]
        x_motion = (
            torch.cat(
                [
                    patches(m[:, 18:19], sd["frame_packer.proj.weight"], sd["frame_packer.proj.bias"]),
                    patches(m[:, 16:18], sd["frame_packer.proj_2x.weight"], sd["frame_packer.proj_2x.bias"]),
                    patches(m[:, 0:16], sd["frame_packer.proj_4x.weight"], sd["frame_packer.proj_4x.bias"]),
                ]
            )
            + mask[2]
        )
        x = torch.cat([x_noisy, x_ref, x_motion])
        n_noisy = len(x_noisy)
        # positions of the tiny 8x8 latents (4x4 token grid), written out from the S2V rules
        positions = [(t, i, j) for t in range(f) for i in range(h) for j in range(w)]
        positions += [(30, i, j) for i in range(h) for j in range(w)]
        positions += [(-1, i, j) for i in range(h) for j in range(w)]
        positions += [(-3, i, j) for i in (0, 3) for j in (0, 3)]
        positions += [(t, 0, 0) for t in (-19, -14, -9, -4)]
        assert len(positions) == len(x)

        def time_embedding(t):
            half = cfg.freq_dim // 2
            angles = t * 10000 ** (-torch.arange(half, dtype=torch.float64) / half)
            e = lin(sd, "time_embedding.2", silu(lin(sd, "time_embedding.0", torch.cat([angles.cos(), angles.sin()]))))
            return e, lin(sd, "time_projection.1", silu(e)).view(6, dim)

        e, e0 = time_embedding(timestep[b])
        _, e0_zero = time_embedding(torch.tensor(0.0, dtype=torch.float64))
        ctx = lin(sd, "text_embedding.2", gelu_tanh(lin(sd, "text_embedding.0", context[b])))
        audio_tokens, audio_global = audio_reference(sd, audio[b], f, cfg.motion_frames)

        for i in range(cfg.num_layers):
            p = f"blocks.{i}"
            mod = sd[f"{p}.modulation"][0]
            per_token = torch.stack([mod + (e0 if t < n_noisy else e0_zero) for t in range(len(x))])  # (L, 6, D)
            shift1, scale1, gate1, shift2, scale2, gate2 = per_token.unbind(1)
            y = layer_norm(x, eps) * (1 + scale1) + shift1
            q = rms_norm(lin(sd, f"{p}.self_attn.q", y), sd[f"{p}.self_attn.norm_q.weight"], eps).view(-1, heads, d)
            k = rms_norm(lin(sd, f"{p}.self_attn.k", y), sd[f"{p}.self_attn.norm_k.weight"], eps).view(-1, heads, d)
            v = lin(sd, f"{p}.self_attn.v", y).view(-1, heads, d)
            a = softmax_attention(rope_reference(q, positions, d), rope_reference(k, positions, d), v)
            x = x + lin(sd, f"{p}.self_attn.o", a.flatten(1)) * gate1
            y = layer_norm(x, eps, sd[f"{p}.norm3.weight"], sd[f"{p}.norm3.bias"])
            q = rms_norm(lin(sd, f"{p}.cross_attn.q", y), sd[f"{p}.cross_attn.norm_q.weight"], eps).view(-1, heads, d)
            k = rms_norm(lin(sd, f"{p}.cross_attn.k", ctx), sd[f"{p}.cross_attn.norm_k.weight"], eps).view(-1, heads, d)
            v = lin(sd, f"{p}.cross_attn.v", ctx).view(-1, heads, d)
            x = x + lin(sd, f"{p}.cross_attn.o", softmax_attention(q, k, v).flatten(1))
            y = layer_norm(x, eps) * (1 + scale2) + shift2
            x = x + lin(sd, f"{p}.ffn.2", gelu_tanh(lin(sd, f"{p}.ffn.0", y))) * gate2
            if i in cfg.audio_inject_layers:
                j = list(cfg.audio_inject_layers).index(i)
                p = f"audio_injector.injector.{j}"
                updated = []
                for frame in range(f):
                    xs = x[frame * h * w : (frame + 1) * h * w]
                    shift, scale = lin(
                        sd, f"audio_injector.injector_adain_layers.{j}.linear", silu(audio_global[frame])
                    ).chunk(2)
                    y = layer_norm(xs, 1e-5) * (1 + scale) + shift
                    q = rms_norm(lin(sd, f"{p}.q", y), sd[f"{p}.norm_q.weight"], eps).view(-1, heads, d)
                    kv = audio_tokens[frame]
                    k = rms_norm(lin(sd, f"{p}.k", kv), sd[f"{p}.norm_k.weight"], eps).view(-1, heads, d)
                    v = lin(sd, f"{p}.v", kv).view(-1, heads, d)
                    updated.append(xs + lin(sd, f"{p}.o", softmax_attention(q, k, v).flatten(1)))
                x = torch.cat(updated + [x[n_noisy:]])

        shift, scale = (sd["head.modulation"][0] + e).unbind(0)
        out = lin(sd, "head.head", layer_norm(x[:n_noisy], eps) * (1 + scale) + shift)
        c = cfg.out_dim
        video = torch.zeros(c, f, 2 * h, 2 * w, dtype=torch.float64)
        for token, (t, i, j) in enumerate(positions[:n_noisy]):
            for p_h in range(2):
                for p_w in range(2):
                    video[:, t, 2 * i + p_h, 2 * j + p_w] = out[token, (p_h * 2 + p_w) * c : (p_h * 2 + p_w + 1) * c]
        outs.append(video)
    return torch.stack(outs)


# ============================================================================ fixtures
@pytest.fixture(scope="module")
def tiny():
    cfg = model_cfg("tiny")
    torch.manual_seed(0)
    model = WanModel(cfg)
    with torch.no_grad():  # every parameter random, none left at 0 or 1
        for param in model.parameters():
            param.add_(0.2 * torch.randn_like(param))
    return cfg, model.eval()


@pytest.fixture(scope="module")
def tiny_inputs(tiny):
    cfg, _ = tiny
    g = torch.Generator().manual_seed(1)
    b, f, h, w = 2, 2, 8, 8
    return dict(
        noisy=torch.randn(b, 16, f, h, w, generator=g),
        timestep=torch.tensor([500.0, 937.0]),
        context=torch.randn(b, cfg.text_len, cfg.text_dim, generator=g),
        audio=torch.randn(b, cfg.audio_layers, 4 * f, cfg.audio_dim, generator=g),
        ref=torch.randn(b, 16, 1, h, w, generator=g),
        motion=torch.randn(b, 16, cfg.motion_frames, h, w, generator=g),
        pose=torch.randn(b, 16, f, h, w, generator=g),
    )


# ============================================================================ tests
def test_tiny_forward_matches_plain_reference(tiny, tiny_inputs):
    cfg, model = tiny
    with torch.no_grad():
        out = model(**tiny_inputs)
    sd = {k: v.to(torch.float64) for k, v in model.state_dict().items()}
    ref = reference_forward(
        sd,
        cfg,
        *(tiny_inputs[k].to(torch.float64) for k in ("noisy", "timestep", "context", "audio", "ref", "motion", "pose")),
    )
    assert out.shape == (2, 16, 2, 8, 8)
    # the fp32 forward against fp64: its chain of reductions over the 72 tokens (tests/tolerance.py)
    bound = chain_close_kwargs(torch.float32, dit_reductions(cfg, tokens=72), scale=ref.abs().max().item())
    torch.testing.assert_close(out.to(torch.float64), ref, **bound)


def test_rope_matches_complex_formula():
    assert rope_pairs(128) == (22, 21, 21)
    g = torch.Generator().manual_seed(0)
    positions = [(t, h, w) for t, h, w in torch.randint(-40, 60, (50, 3), generator=g).tolist()]
    for head_dim in (128, 16):
        x = torch.randn(1, len(positions), 3, head_dim, generator=g)
        cos, sin = rope_angles(torch.tensor(positions), head_dim)
        got = apply_rope(x, cos, sin)
        # each output is a sum of 2 products whose tables were rounded to fp32: 2 roundings deep,
        # relative to the rotated values' size
        bound = reordered_sum_tolerance(torch.float32, terms=2, depth=2)
        torch.testing.assert_close(
            got[0].double(),
            rope_reference(x[0], positions, head_dim),
            rtol=bound,
            atol=bound * x.abs().max().item(),
        )


def test_modulation_chunk_order_and_norm_placement(tiny):
    """Chunks are (shift, scale, gate) for attention then FFN, applied after a plain LayerNorm."""
    cfg, model = tiny
    block = model.blocks[1]
    from wan_exp.models.wan_s2v import TokenLayout

    x = torch.randn(1, 6, cfg.dim)
    context = torch.randn(1, 3, cfg.dim)
    cos, sin = rope_angles(torch.zeros(6, 3, dtype=torch.long), cfg.dim // cfg.num_heads)
    tokens = TokenLayout(cos, sin, n_noisy=6, frame_runs=[], dtype=torch.float32)
    shift = torch.randn(cfg.dim)
    time_mod = torch.zeros(1, 1, 6, cfg.dim) - block.modulation.detach()[None]  # cancel the block's own
    time_mod[0, 0, 0] += shift  # attention shift
    time_mod[0, 0, 1] += -1.0  # attention scale: 1 + scale = 0, so the normed x is dropped
    time_mod[0, 0, 2] += 2.0  # attention gate
    # FFN gate (chunk 5) stays 0: no FFN contribution
    with torch.no_grad():
        out = block(x, time_mod, context, tokens)
        # every token sees the same input `shift`, so attention returns o(v(shift)) for each
        attn_out = block.self_attn.o(block.self_attn.v(shift))
        x1 = x + 2.0 * attn_out
        expected = x1 + block.cross_attn(block.norm3(x1), context)
    # the same modules on other shapes: the modulation's two-term cancellations, the
    # self-attention over the 6 tokens and the cross-attention over the 3 context tokens
    dim, head_dim = cfg.dim, cfg.dim // cfg.num_heads
    reductions = [2, 2, dim, dim, *attention_reductions(head_dim, 6), dim]
    reductions += [dim, dim, dim, dim, *attention_reductions(head_dim, 3), dim]
    torch.testing.assert_close(
        out, expected, **chain_close_kwargs(torch.float32, reductions, scale=expected.abs().max().item())
    )


class ThreadedSequenceSharding:
    """Sequence sharding over `degree` threads of one process: an all-gather through shared
    slots and a barrier (the model's hook contract; the real Ulysses lives in wan_exp.parallel)."""

    def __init__(self, rank, degree, barrier, slots):
        self.rank, self.degree, self.barrier, self.slots = rank, degree, barrier, slots
        self.full_len = {}

    def shard(self, t, dim):
        length = t.shape[dim]
        self.full_len[dim] = length
        per = -(-length // self.degree)
        pad = per * self.degree - length
        padded = torch.cat([t, t.new_zeros(*t.shape[:dim], pad, *t.shape[dim + 1 :])], dim=dim)
        return padded.narrow(dim, self.rank * per, per)

    def _all_gather(self, t, dim):
        self.barrier.wait()
        self.slots[self.rank] = t
        self.barrier.wait()
        full = torch.cat(list(self.slots), dim=dim)
        self.barrier.wait()
        return full

    def gather(self, t, dim):
        return self._all_gather(t, dim).narrow(dim, 0, self.full_len[dim])

    def attention(self, q, k, v, attn_fn):
        n = self.full_len[1]
        full = [self._all_gather(t, 1)[:, :n] for t in (q, k, v)]
        out = attn_fn(*full)
        per = q.shape[1]
        out = torch.cat([out, out.new_zeros(out.shape[0], per * self.degree - n, *out.shape[2:])], dim=1)
        return out[:, self.rank * per : (self.rank + 1) * per]


def test_sequence_sharding_hooks_give_the_same_flow(tiny, tiny_inputs):
    """5 shards of 72 tokens (padded to 75) cut frames and the noisy/conditioning boundary."""
    cfg, model = tiny
    with torch.no_grad():
        expected = model(**tiny_inputs)
    degree = 5
    # a failing thread breaks the barrier (timeout) instead of leaving the others waiting
    barrier, slots, results = threading.Barrier(degree, timeout=60), [None] * degree, [None] * degree
    replicas = []
    for rank in range(degree):
        replica = WanModel(cfg)
        replica.load_state_dict(model.state_dict())
        replica.sequence_sharding = ThreadedSequenceSharding(rank, degree, barrier, slots)
        replicas.append(replica)

    def run(rank):
        try:
            with torch.no_grad():
                results[rank] = replicas[rank](**tiny_inputs)
        except Exception as err:  # reported below, by rank
            results[rank] = err

    threads = [threading.Thread(target=run, args=(r,), daemon=True) for r in range(degree)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert replicas[0].sequence_sharding.full_len[1] == sequence_length(cfg, 64, 64, 8) == 72
    # shards and the whole sequence sum in other shapes: the forward's chain (tests/tolerance.py)
    bound = chain_close_kwargs(torch.float32, dit_reductions(cfg, tokens=72), scale=expected.abs().max().item())
    for rank, out in enumerate(results):
        assert isinstance(out, torch.Tensor), f"rank {rank}: {out!r}"
        torch.testing.assert_close(out, expected, **bound)


def test_first_clip_without_motion_and_without_pose(tiny, tiny_inputs):
    cfg, model = tiny
    inputs = dict(tiny_inputs, motion=None, pose=None)
    with torch.no_grad():
        out = model(**inputs)
        zero_pose = model(**dict(inputs, pose=torch.zeros_like(tiny_inputs["pose"])))
    # no pose = zero pose latents: a convolution of zeros is exactly its bias, the rest the same ops
    torch.testing.assert_close(out, zero_pose, rtol=0, atol=0)
    assert sequence_length(cfg, 64, 64, 8, with_motion=False) == 32 + 16


def test_audio_shorter_than_the_clip_is_rejected(tiny, tiny_inputs):
    _, model = tiny
    with pytest.raises(ValueError, match="one wav2vec2 feature per video frame"):
        model(**dict(tiny_inputs, audio=tiny_inputs["audio"][:, :, :5]))


# ============================================================================ 14B on meta
def official_shapes(cfg) -> dict[str, tuple[int, ...]]:
    """The official state-dict names and shapes, written out from docs/facts.md §7."""
    d, f, t = cfg.dim, cfg.ffn_dim, cfg.text_dim
    shapes = {
        "patch_embedding.weight": (d, 16, 1, 2, 2),
        "patch_embedding.bias": (d,),
        "text_embedding.0.weight": (d, t),
        "text_embedding.0.bias": (d,),
        "text_embedding.2.weight": (d, d),
        "text_embedding.2.bias": (d,),
        "time_embedding.0.weight": (d, cfg.freq_dim),
        "time_embedding.0.bias": (d,),
        "time_embedding.2.weight": (d, d),
        "time_embedding.2.bias": (d,),
        "time_projection.1.weight": (6 * d, d),
        "time_projection.1.bias": (6 * d,),
        "head.head.weight": (64, d),
        "head.head.bias": (64,),
        "head.modulation": (1, 2, d),
    }

    def attention(prefix):
        for name in "qkvo":
            shapes[f"{prefix}.{name}.weight"] = (d, d)
            shapes[f"{prefix}.{name}.bias"] = (d,)
        shapes[f"{prefix}.norm_q.weight"] = shapes[f"{prefix}.norm_k.weight"] = (d,)

    for i in range(cfg.num_layers):
        p = f"blocks.{i}"
        attention(f"{p}.self_attn")
        attention(f"{p}.cross_attn")
        shapes.update(
            {
                f"{p}.norm3.weight": (d,),
                f"{p}.norm3.bias": (d,),
                f"{p}.modulation": (1, 6, d),
                f"{p}.ffn.0.weight": (f, d),
                f"{p}.ffn.0.bias": (f,),
                f"{p}.ffn.2.weight": (d, f),
                f"{p}.ffn.2.bias": (d,),
            }
        )
    if not cfg.s2v:
        return shapes
    a = cfg.audio_dim
    enc = "casual_audio_encoder.encoder"
    shapes.update(
        {
            "cond_encoder.weight": (d, 16, 1, 2, 2),
            "cond_encoder.bias": (d,),
            "trainable_cond_mask.weight": (3, d),
            "casual_audio_encoder.weights": (1, 25, 1, 1),
            f"{enc}.conv1_local.conv.weight": (d, a, 3),
            f"{enc}.conv1_local.conv.bias": (d,),
            f"{enc}.conv1_global.conv.weight": (d // 4, a, 3),
            f"{enc}.conv1_global.conv.bias": (d // 4,),
            f"{enc}.conv2.conv.weight": (d // 2, d // 4, 3),
            f"{enc}.conv2.conv.bias": (d // 2,),
            f"{enc}.conv3.conv.weight": (d, d // 2, 3),
            f"{enc}.conv3.conv.bias": (d,),
            f"{enc}.final_linear.weight": (d, d),
            f"{enc}.final_linear.bias": (d,),
            f"{enc}.padding_tokens": (1, 1, 1, d),
            "frame_packer.proj.weight": (d, 16, 1, 2, 2),
            "frame_packer.proj.bias": (d,),
            "frame_packer.proj_2x.weight": (d, 16, 2, 4, 4),
            "frame_packer.proj_2x.bias": (d,),
            "frame_packer.proj_4x.weight": (d, 16, 4, 8, 8),
            "frame_packer.proj_4x.bias": (d,),
        }
    )
    for j in range(len(cfg.audio_inject_layers)):
        attention(f"audio_injector.injector.{j}")
        shapes[f"audio_injector.injector_adain_layers.{j}.linear.weight"] = (2 * d, d)
        shapes[f"audio_injector.injector_adain_layers.{j}.linear.bias"] = (2 * d,)
    return shapes


@pytest.mark.parametrize("name, n_keys, billions", [("s2v_14b", 1260, 16.30), ("t2v_14b", 1095, 14.29)])
def test_14b_configs_on_meta_have_the_official_keys_shapes_and_size(name, n_keys, billions):
    cfg = model_cfg(name)
    with torch.device("meta"):
        model = WanModel(cfg)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert len(shapes) == n_keys
    assert shapes == official_shapes(cfg)
    assert sum(p.numel() for p in model.parameters()) / 1e9 == pytest.approx(billions, abs=0.005)


def test_sequence_length_of_the_official_sizes():
    cfg = model_cfg("s2v_14b")
    # 704x1024: 20*1408 noisy + 1408 ref + 1.5*1408 motion (docs/facts.md §7)
    assert sequence_length(cfg, 704, 1024, 80) == 63360
    # 480x832: 60 latent rows do not divide by the 4x packer's 8, so motion has 1560+390+364 tokens
    assert sequence_length(cfg, 480, 832, 80) == 31200 + 1560 + 1560 + 390 + 364
    assert sequence_length(cfg, 480, 832, 80, with_motion=False) == 21 * 1560
    assert sequence_length(model_cfg("t2v_14b"), 480, 832, 80) == 31200


# ============================================================================ built from outside
def test_the_constructor_builds_the_model_only_compile_is_applied_from_outside():
    """WanModel(cfg) neither compiles nor touches the process-wide attention backend, whatever
    model.compile and model.attention_backend say; apply_compile compiles each block and the
    audio injector, and does nothing when model.compile is off."""
    q = torch.randn(1, 4, 2, 8)
    attn_backend.configure("sdpa")
    attn_backend.attention(q, q, q)
    assert attn_backend.selected_backend() == "sdpa"
    cfg = model_cfg("tiny")
    cfg.compile, cfg.attention_backend = True, "sdpa_math"
    with torch.device("meta"):
        model = WanModel(cfg)
    assert attn_backend.selected_backend() == "sdpa"  # configure() would have reset the choice
    assert model.audio_injector.inject is inject_audio
    assert all(block._compiled_call_impl is None for block in model.blocks)

    cfg.compile = False
    apply_compile(model, cfg)
    assert model.audio_injector.inject is inject_audio
    cfg.compile = True
    apply_compile(model, cfg)
    assert model.audio_injector.inject is not inject_audio
    assert all(block._compiled_call_impl is not None for block in model.blocks)
    attn_backend.configure("auto")
