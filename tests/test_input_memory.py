"""Inputs against the host: a long audio file whose encoding cannot fit is refused before launch,
naming the file, its length and workload.clips; the pre-launch read streams the file."""

from __future__ import annotations

import resource
import subprocess
import sys
import wave

import numpy as np
import pytest
from PIL import Image

from launch_helpers import REPO, output
from wan_exp.config import compose_config
from wan_exp.media import audio_peak_and_samples, read_audio, reference_pixels
from wan_exp.memory_fit import audio_encode_bytes

GIB = 1024**3


def write_wav(path, seconds: float, rate: int = 16000) -> None:
    """A 220 Hz tone, 16-bit mono."""
    t = np.arange(int(seconds * rate)) / rate
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes((0.3 * np.sin(2 * np.pi * 220 * t) * 32767).astype(np.int16).tobytes())


def test_the_streamed_pre_launch_read_sees_what_the_rank_reads(tmp_path):
    write_wav(tmp_path / "a.wav", 3.0, rate=22050)
    waveform = read_audio(tmp_path / "a.wav")
    peak, samples = audio_peak_and_samples(tmp_path / "a.wav")
    assert samples == waveform.size  # the 16 kHz length the rank gets
    with wave.open(str(tmp_path / "a.wav"), "rb") as source:  # the peak at the file's own rate
        ints = np.frombuffer(source.readframes(source.getnframes()), dtype=np.int16)
    assert peak == float(np.abs(ints).max()) / 32768
    assert waveform.size == pytest.approx(3 * 16000, abs=64)  # resampled to 16 kHz


def test_the_audio_estimate_grows_with_the_length_and_the_encoder():
    tiny, big = compose_config(["model=tiny"]).model, compose_config(["model=s2v_14b"]).model
    # per sample: 4 waveform copies + 4 x 512/5 conv channels + 4 x (layers + 1) x hidden / 320, fp32
    assert audio_encode_bytes(tiny, 16000) == int(16000 * (4 + 4 * 512 / 5 + 4 * 3 * 32 / 320) * 4)
    assert audio_encode_bytes(tiny, 32000) == 2 * audio_encode_bytes(tiny, 16000)
    assert audio_encode_bytes(big, 16000) > audio_encode_bytes(tiny, 16000)


def _address_space_limit() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (4 * GIB, resource.RLIM_INFINITY))


@pytest.mark.slow
def test_a_ten_minute_audio_file_over_the_memory_limit_is_refused_before_launch(tmp_path):
    """Under a 4 GiB address-space limit (ulimit -v), wav2vec2 over 600 s of audio (about 11 GiB
    per rank for the tiny model's encoder) cannot fit: no job starts, and the message names the
    file, its length and workload.clips."""
    audio = tmp_path / "ten minutes.wav"
    write_wav(audio, 600.0)
    cmd = [
        sys.executable,
        str(REPO / "launch.py"),
        f"workload.audio_path={audio}",
        "logger=disabled",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
    ]
    proc = subprocess.run(
        cmd, cwd=REPO, capture_output=True, text=True, timeout=300, check=False, preexec_fn=_address_space_limit
    )
    text = output(proc)
    assert proc.returncode == 1, text
    assert "bad config, no job started" in text and "Traceback" not in text
    assert f"workload.audio_path='{audio}' is 600 s long" in text
    assert "workload.clips=1 uses only its first 0.5 s" in text and "4.00 GiB is available" in text
    assert not list((tmp_path / "sweep").glob("*/results.json")), "no job ran"


def test_a_very_large_image_is_downscaled_on_read(tmp_path):
    """An 8000x5000 JPEG for a 64x64 output: decoded at 1/8 scale (1000x625), never whole (its
    RGB pixels alone would be 114 MiB); the pixels match the whole decode's up to the
    decoder's own scaling."""
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (50, 80, 3), dtype=np.uint8)).resize((8000, 5000)).save(
        tmp_path / "big.jpg", quality=90
    )
    code = (
        "import resource, sys\nfrom wan_exp.media import reference_pixels\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "reference_pixels(sys.argv[1], 64, 64)\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "big.jpg")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    whole_rgb = 8000 * 5000 * 3
    assert int(proc.stdout) < whole_rgb / 2, f"peak grew by {int(proc.stdout) / 2**20:.0f} MiB"
    downscaled = reference_pixels(tmp_path / "big.jpg", 64, 64)
    with Image.open(tmp_path / "big.jpg") as opened:  # the whole decode, resized as upstream does
        whole = np.asarray(opened.convert("RGB").resize((102, 64), Image.BILINEAR), dtype=np.float32)
    whole = whole[:, 19:83] / 127.5 - 1.0
    assert np.abs(downscaled - whole).mean() < 0.02  # about 2.5 grey levels of 255
