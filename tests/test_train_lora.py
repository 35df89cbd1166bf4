"""train_lora: regex targets, frozen base, gradients equal to one rank, peft-format adapters.

The distributed checks run in ONE torchrun launch of 2 CPU ranks (gloo):
tests/dist/lora_train.py says what each case checks.
"""

from __future__ import annotations

import re

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from launch_helpers import REPO, torchrun
from wan_exp.config import compose_config as compose_experiment
from wan_exp.geometry import job_geometry
from wan_exp.models.wan_s2v import WanModel
from wan_exp.parallel.registry import setup_parallel
from wan_exp.rank.runtime import RankContext
from wan_exp.workloads.train_lora import adapter_parameters, inject_lora, train_step, training_inputs


def compose_config(*overrides: str):
    return compose_experiment(["model=tiny", "workload=train_lora", *overrides])


def single_rank_model(cfg, matched: list):
    ctx = RankContext(cfg, 0, 0, 1, torch.device("cpu"), None)
    return setup_parallel(
        cfg, ctx, before_wrap=lambda dit: matched.extend(inject_lora(dit, cfg.workload.lora, cfg.seed))
    )


def test_default_regex_targets_attention_and_ffn_projections_only():
    cfg = compose_config("parallel=single")
    matched: list[str] = []
    single_rank_model(cfg, matched)
    expected = {f"blocks.{b}.{attn}.{p}" for b in range(4) for attn in ("self_attn", "cross_attn") for p in "qkvo"} | {
        f"blocks.{b}.ffn.{i}" for b in range(4) for i in (0, 2)
    }
    assert set(matched) == expected
    # the audio injector's cross-attentions also end in .q/.k/.v/.o but are not DiT blocks
    assert not [name for name in matched if name.startswith("audio_injector")]


def test_one_training_step_moves_only_the_adapters():
    cfg = compose_config("parallel=single")
    parallel_model = single_rank_model(cfg, [])
    dit = parallel_model.dit
    before = {name: p.detach().clone() for name, p in dit.named_parameters()}
    params = adapter_parameters(dit)
    assert params and all("lora_" in name for name, p in dit.named_parameters() if p.requires_grad)
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    inputs = training_inputs(cfg, job_geometry(cfg), parallel_model, torch.device("cpu"))
    loss = train_step(dit, inputs, torch.Generator().manual_seed(0), 3.0, 1.0, None)
    optimizer.step()
    assert loss > 0
    changed = {name for name, p in dit.named_parameters() if not torch.equal(p, before[name])}
    assert changed == {name for name, p in dit.named_parameters() if p.requires_grad}
    assert any(p.grad.abs().sum() > 0 for p in params)
    assert all(p.grad is None for p in dit.parameters() if not p.requires_grad)


def test_regex_matching_nothing_is_a_clear_error():
    cfg = compose_config("parallel=single", "workload.lora.target_regex=blocks\\.\\d+\\.nothing")
    with pytest.raises(ValueError, match=r"workload.lora.target_regex=.*matches no module of the DiT"):
        single_rank_model(cfg, [])


def test_invalid_regex_names_the_setting():
    cfg = compose_config("parallel=single", "workload.lora.target_regex='blocks.(q'")
    with pytest.raises(ValueError, match=r"workload.lora.target_regex='blocks.\(q' is not a valid regex"):
        single_rank_model(cfg, [])


def test_gradients_equal_one_rank_under_every_strategy_and_adapters_reload_with_peft(tmp_path):
    proc = torchrun(2, str(REPO / "tests" / "dist" / "lora_train.py"), str(tmp_path), timeout=170)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    assert re.search(r"LORA GRADIENTS MATCH \(5 cases, \d+ adapter tensors\)", proc.stdout), output[-6000:]

    cfg = compose_config()
    reloaded = {}
    for case in ("single", "fsdp1", "fsdp2"):
        folder = tmp_path / case / "lora_adapter"
        assert (folder / "adapter_config.json").is_file() and (folder / "adapter_model.safetensors").is_file()
        saved = load_file(str(folder / "adapter_model.safetensors"))
        model = PeftModel.from_pretrained(WanModel(cfg.model), str(folder))
        adapters = {name: p for name, p in model.named_parameters() if "lora_" in name}
        assert len(adapters) == len(saved) == 2 * 40  # A and B of 40 adapted projections
        for key, value in saved.items():  # peft put every saved tensor where it belongs
            name = key.replace(".lora_A.weight", ".lora_A.default.weight").replace(
                ".lora_B.weight", ".lora_B.default.weight"
            )
            torch.testing.assert_close(adapters[name], value, rtol=0, atol=0)
        assert any(v.abs().sum() > 0 for k, v in saved.items() if "lora_B" in k)  # trained
        reloaded[case] = saved
    # FSDP training from the same start gives the single-rank adapters
    for case in ("fsdp1", "fsdp2"):
        for key, value in reloaded["single"].items():
            torch.testing.assert_close(reloaded[case][key], value, rtol=1e-4, atol=1e-6)
