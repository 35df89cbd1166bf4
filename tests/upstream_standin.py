"""A stand-in Wan2.2 checkout and checkpoint folder for the workload=upstream tests.

The checkout has upstream's layout where wan-exp looks at it: ``generate.py`` declaring
upstream's flags with argparse, ``wan/__init__.py`` importing ``wan/speech2video.py``, which
binds ``from .distributed.fsdp import shard_model`` at import time as upstream does, and
``wan/configs`` with the WAN_CONFIGS / SIZE_CONFIGS literals and the S2V task config. Its
generate.py does small real work on gloo: loads a tiny model from the checkpoint folder's
safetensors, wraps it with shard_model (a real FSDP1 wrap) under --dit_fsdp and writes what
the wrap received and how much of the model this rank holds, runs the steps with tqdm
(an all-reduce per step under --ulysses_size), and on rank 0 writes the video with PyAV.
With ``hang=True`` rank 1 never joins the process group, so rank 0 waits in it forever.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import torch
from safetensors.torch import save_file

STANDIN_WIDTH = 8  # the stand-in model's Linear width
STANDIN_BLOCKS = 3

FLAGS = {  # flag -> argparse keyword text, as upstream declares them
    "--task": 'type=str, default="t2v-A14B"',
    "--size": 'type=str, default="1280*720"',
    "--frame_num": "type=int, default=None",
    "--ckpt_dir": "type=str, default=None",
    "--offload_model": "type=str, default=None",
    "--ulysses_size": "type=int, default=1",
    "--t5_fsdp": 'action="store_true"',
    "--t5_cpu": 'action="store_true"',
    "--dit_fsdp": 'action="store_true"',
    "--save_file": "type=str, default=None",
    "--prompt": "type=str, default=None",
    "--base_seed": "type=int, default=-1",
    "--image": "type=str, default=None",
    "--sample_solver": 'type=str, default="unipc"',
    "--sample_steps": "type=int, default=None",
    "--sample_shift": "type=float, default=None",
    "--sample_guide_scale": "type=float, default=None",
    "--convert_model_dtype": 'action="store_true"',
    "--num_clip": "type=int, default=None",
    "--audio": "type=str, default=None",
    "--infer_frames": "type=int, default=80",
}

GENERATE = """\
import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from tqdm import tqdm

import wan
from wan.speech2video import WanS2V


def _parse_args():
    parser = argparse.ArgumentParser()
{arguments}
    return parser.parse_args()


def generate(args):
    rank, world = int(os.getenv("RANK", 0)), int(os.getenv("WORLD_SIZE", 1))
    if rank == 0:
        logging.basicConfig(level=logging.INFO, handlers=[logging.StreamHandler(stream=sys.stdout)])
    {hang}
    if world > 1:
        dist.init_process_group("gloo")
    out = Path(args.save_file).parent
    if rank == 0:
        (out / "standin_args.json").write_text(json.dumps(vars(args)))
    logging.info("Creating WanS2V pipeline.")
    pipe = WanS2V(args.ckpt_dir, dit_fsdp=args.dit_fsdp, rank=rank, out=out)
    logging.info("Generating video ...")
    x = torch.randn(4, {width}, generator=torch.Generator().manual_seed(args.base_seed))
    for clip in range(args.num_clip):
        for _ in tqdm(range(args.sample_steps)):
            with torch.no_grad():
                x = torch.tanh(pipe.model(x))
            if args.ulysses_size > 1:
                dist.all_reduce(x)
                x = x / world
            time.sleep(0.15)
    if rank == 0:
        from wan_exp.media import write_video

        # as upstream's S2V: every clip's frames less the 3 the first clip drops
        frames = np.zeros((args.num_clip * args.infer_frames - 3, 32, 32, 3), np.uint8)
        logging.info(f"Saving generated video to {{args.save_file}}")
        audio = np.sin(np.arange(16000 * 2) / 10.0).astype(np.float32)
        write_video(args.save_file, frames, 16, audio, 16000)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    logging.info("Finished.")


if __name__ == "__main__":
    generate(_parse_args())
"""

SPEECH2VIDEO = """\
import json

import torch
import torch.distributed as dist
from safetensors.torch import load_file

from .distributed.fsdp import shard_model


class Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList(torch.nn.Linear({width}, {width}) for _ in range({blocks}))

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


class WanS2V:
    def __init__(self, checkpoint_dir, dit_fsdp, rank, out):
        model = Model()
        model.load_state_dict(load_file(f"{{checkpoint_dir}}/diffusion_pytorch_model.safetensors"))
        if dit_fsdp:
            model = shard_model(model, device_id=torch.device("cpu"))
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

            held = sum(p.numel() for p in model.parameters())
            units = sum(1 for m in model.modules() if isinstance(m, FSDP))
            (out / f"standin_fsdp_rank{{rank}}.json").write_text(json.dumps(
                {{"sync_module_states": model.standin_sync_module_states, "held_numel": held, "fsdp_units": units}}))
        self.model = model
"""

FSDP = """\
from functools import partial

import torch
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.fsdp import ShardingStrategy
from torch.distributed.fsdp.wrap import lambda_auto_wrap_policy


def shard_model(model, device_id, param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                buffer_dtype=torch.float32, process_group=None, sharding_strategy=ShardingStrategy.FULL_SHARD,
                sync_module_states=True, use_lora=False):
    wrapped = FSDP(module=model, process_group=process_group, sharding_strategy=sharding_strategy,
                   auto_wrap_policy=partial(lambda_auto_wrap_policy, lambda_fn=lambda m: m in model.blocks),
                   device_id=device_id, sync_module_states=sync_module_states)
    wrapped.standin_sync_module_states = sync_module_states  # what reached FSDP, for the test
    return wrapped
"""

CONFIGS = """\
from .wan_s2v_14B import s2v_14B

WAN_CONFIGS = {"t2v-A14B": None, "s2v-14B": s2v_14B}
SIZE_CONFIGS = {"480*832": (480, 832), "832*480": (832, 480), "64*64": (64, 64)}
"""

TASK_CONFIG = """\
class _Config:
    pass


s2v_14B = _Config()
s2v_14B.t5_checkpoint = "models_t5_umt5-xxl-enc-bf16.pth"
s2v_14B.t5_tokenizer = "google/umt5-xxl"
s2v_14B.vae_checkpoint = "Wan2.1_VAE.pth"
s2v_14B.wav2vec = "wav2vec2-large-xlsr-53-english"
"""

HANG = """print(f"rank {rank} imported", flush=True)  # a heartbeat: the hang timeout counts from here
    if rank == 1:
        time.sleep(10**6)  # never joins: rank 0 waits in init_process_group"""


def write_checkout(folder: Path, hang: bool = False, drop_flags: tuple[str, ...] = ()) -> Path:
    """The stand-in checkout in ``folder``; ``drop_flags`` leaves flags out of generate.py."""
    arguments = "\n".join(
        f'    parser.add_argument("{flag}", {spec})' for flag, spec in FLAGS.items() if flag not in drop_flags
    )
    files = {
        "generate.py": GENERATE.format(arguments=arguments, width=STANDIN_WIDTH, hang=HANG if hang else "pass"),
        "wan/__init__.py": "from . import speech2video\n",
        "wan/speech2video.py": SPEECH2VIDEO.format(width=STANDIN_WIDTH, blocks=STANDIN_BLOCKS),
        "wan/distributed/__init__.py": "",
        "wan/distributed/fsdp.py": FSDP,
        "wan/configs/__init__.py": CONFIGS,
        "wan/configs/wan_s2v_14B.py": TASK_CONFIG,
    }
    # generate.py's example inputs (read when workload.image_path / audio_path are unset; the stand-in never opens them)
    files["examples/i2v_input.JPG"] = "placeholder"
    files["examples/talk.wav"] = "placeholder"
    for name, text in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return folder


def standin_numel() -> int:
    return STANDIN_BLOCKS * (STANDIN_WIDTH * STANDIN_WIDTH + STANDIN_WIDTH)


def write_checkpoint_folder(folder: Path) -> Path:
    """Every file the preflight names (placeholders for the encoders and VAE), and the stand-in
    model's weights as the one-file DiT layout."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    weights = {
        f"blocks.{i}.{p}": torch.randn(STANDIN_WIDTH, STANDIN_WIDTH) if p == "weight" else torch.randn(STANDIN_WIDTH)
        for i in range(STANDIN_BLOCKS)
        for p in ("weight", "bias")
    }
    save_file(weights, str(folder / "diffusion_pytorch_model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"dim": STANDIN_WIDTH}))
    for name in ("models_t5_umt5-xxl-enc-bf16.pth", "Wan2.1_VAE.pth"):
        (folder / name).write_bytes(b"placeholder")
    (folder / "google" / "umt5-xxl").mkdir(parents=True, exist_ok=True)
    wav2vec = folder / "wav2vec2-large-xlsr-53-english"
    wav2vec.mkdir(exist_ok=True)
    for name in ("config.json", "preprocessor_config.json", "model.safetensors"):
        (wav2vec / name).write_text("{}")
    return folder
