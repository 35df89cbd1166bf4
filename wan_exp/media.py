"""Files in and out of the generate workload: the audio, the reference image, the video.

No torch here: the launcher's checks (``preflight``, ``geometry``) read the files with these
readers before any rank starts, and the ranks use them too.
docs/pipeline.md states the rules.

- Audio: any file ffmpeg decodes (wav, flac, mp3, ...; any rate, any channel layout), decoded
  by PyAV, the channels averaged, resampled to 16 kHz with soxr as upstream's librosa does.
- Reference image: the output size chosen from the image within the area of ``workload.size``
  (multiples of 64), then the shorter side resized and the centre cropped, padded with black
  where the aspect ratios differ.
- Video: H.264 in an mp4 with the audio muxed in (AAC), through PyAV.
"""

from __future__ import annotations

import math
import os
from fractions import Fraction
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np

from wan_exp.liveness import beat
from wan_exp.results import write_error

SAMPLE_RATE = 16000  # wav2vec2's input rate
SIZE_MULTIPLE = 64  # the output size chosen from an image is padded up to multiples of this
SILENCE_PEAK = 1e-4  # an audio file whose samples all stay below this is silent
AUDIO_FRAME_SAMPLES = 1024  # samples per AAC frame when muxing
RESAMPLE_QUALITY = "soxr_hq"  # librosa.load's default res_type, what upstream reads audio with
# an image with this many times the output's pixels is decoded at a reduced scale (JPEG's
# 1/2, 1/4, 1/8, still at least the resize target), so a 100-megapixel photo never sits whole in
# host memory; smaller images are decoded whole, as upstream does
DOWNSCALE_ON_READ_FACTOR = 16


# ------------------------------------------------------------------------------ audio
def resample_to_16k(waveform: np.ndarray, rate: int) -> np.ndarray:
    """A mono float32 waveform at ``rate`` -> 16 kHz as upstream's loader does it (librosa's
    default): soxr at quality ``soxr_hq`` over the whole signal in one call, then cut or
    zero-padded to ceil(samples * 16000 / rate). Unchanged at 16 kHz."""
    import soxr

    if rate == SAMPLE_RATE:
        return waveform
    resampled = soxr.resample(waveform, rate, SAMPLE_RATE, quality=RESAMPLE_QUALITY)
    length = math.ceil(waveform.size * SAMPLE_RATE / rate)
    return np.pad(resampled[:length], (0, max(length - resampled.size, 0))).astype(np.float32)


def read_audio(path: str | Path) -> np.ndarray:
    """(samples,) float32 mono waveform at 16 kHz from any audio file ffmpeg decodes: decoded
    to float at the file's own rate (integer samples / 2^(bits-1), as soundfile reads them),
    the channels averaged, then ``resample_to_16k``. FileNotFoundError for a missing file,
    ValueError for an unreadable or empty one, each naming ``workload.audio_path``."""
    chunks, rate = [], SAMPLE_RATE
    for chunk_rate, chunk in audio_chunks(path):
        chunks.append(chunk)
        rate = chunk_rate
    waveform = np.concatenate(chunks).astype(np.float32) if chunks else np.zeros(0, np.float32)
    if waveform.size == 0:
        raise ValueError(f"workload.audio_path={str(path)!r} holds no audio samples")
    return resample_to_16k(waveform, rate)


def audio_peak_and_samples(path: str | Path) -> tuple[float, int]:
    """(largest |sample| at the file's own rate, samples the 16 kHz waveform will have) of an
    audio file, decoded a frame at a time: the pre-launch check never holds a long file whole."""
    peak, samples, rate = 0.0, 0, SAMPLE_RATE
    for chunk_rate, chunk in audio_chunks(path):
        rate = chunk_rate
        if chunk.size:
            peak, samples = max(peak, float(np.abs(chunk).max())), samples + chunk.size
    if samples == 0:
        raise ValueError(f"workload.audio_path={str(path)!r} holds no audio samples")
    return peak, math.ceil(samples * SAMPLE_RATE / rate)


def audio_chunks(path: str | Path) -> Iterator[tuple[int, np.ndarray]]:
    """(the file's sample rate, its mono samples as float32) one decoded frame at a time: to
    float at the file's own rate, the channels averaged (no resampling here)."""
    import av

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"workload.audio_path={str(path)!r} does not exist")
    try:
        with av.open(str(path)) as container:
            stream = next((s for s in container.streams if s.type == "audio"), None)
            if stream is None:
                raise ValueError("it has no audio stream")
            to_float = av.AudioResampler(format="fltp")  # sample format only: rate and layout kept
            rate = SAMPLE_RATE
            for frame in container.decode(stream):
                beat("audio read")
                rate = frame.sample_rate
                for out in to_float.resample(frame):
                    yield rate, out.to_ndarray().mean(axis=0).astype(np.float32)
            for out in to_float.resample(None):
                yield rate, out.to_ndarray().mean(axis=0).astype(np.float32)
    except (av.FFmpegError, ValueError, OSError) as exc:
        raise ValueError(
            f"workload.audio_path={str(path)!r} is not a readable audio file ({exc}); use a wav, flac or mp3 file"
        ) from None


# ------------------------------------------------------------------------------ image
SIZE_SCALES_TRIED = 100  # upstream tries this many scales, evenly spaced, from the largest down
SMALL_IMAGE_SMALLEST_SCALE = 0.1  # the bottom of that range for an image already within the area


def _scale_range(height: int, width: int, area: int, multiple: int) -> tuple[float, float]:
    """(largest, smallest) scale of upstream's search. An image within the area: 1 down to 0.1
    (it is only padded, never enlarged). A larger one: from the scale that fills the area
    exactly, sqrt(area / (h*w)), down to the root of upstream's quadratic for the worst-case
    padding, (-b + sqrt(b^2 - 2ac)) / 2a with a = h*w, b = (multiple - 1)(h + w),
    c = (multiple - 1)^2 - area (upstream's formula as written, with 2ac)."""
    if height * width <= area:
        return 1.0, SMALL_IMAGE_SMALLEST_SCALE
    pad = multiple - 1
    a, b, c = height * width, pad * (height + width), pad**2 - area
    return math.sqrt(area / (height * width)), (-b + math.sqrt(b * b - 2 * a * c)) / (2 * a)


def size_within_area(height: int, width: int, area: int, multiple: int = SIZE_MULTIPLE) -> tuple[int, int]:
    """(H, W) of the video for an image of height x width, as upstream S2V chooses it
    (docs/pipeline.md, "Reference image"): ``SIZE_SCALES_TRIED`` scales, evenly spaced from the
    largest of ``_scale_range`` down (the smallest itself is never tried); at each, both sides
    scaled and truncated, then padded up to multiples of ``multiple``; the first whose padded
    area is within ``area`` wins. If none does: the sides of a frame of the image's aspect
    ratio and the whole area, each rounded down to a multiple, or the image's own sides
    rounded down where that frame would be larger than the image. ValueError where that
    leaves a side of zero (an area or an image smaller than one block)."""
    largest, smallest = _scale_range(height, width, area, multiple)
    for i in range(SIZE_SCALES_TRIED):
        scale = largest - (largest - smallest) * i / SIZE_SCALES_TRIED
        padded_h = -(-int(height * scale) // multiple) * multiple
        padded_w = -(-int(width * scale) // multiple) * multiple
        if padded_h * padded_w <= area:
            return padded_h, padded_w
    aspect = width / height
    fallback_w = int((area * aspect) ** 0.5 // multiple * multiple)
    fallback_h = int((area / aspect) ** 0.5 // multiple * multiple)
    if fallback_w >= width or fallback_h >= height:
        fallback_w, fallback_h = width // multiple * multiple, height // multiple * multiple
    if fallback_h == 0 or fallback_w == 0:
        raise ValueError(
            f"workload.size: no {multiple}-multiple size within the area {area} for an image "
            f"of {height}x{width}; use a larger workload.size or a larger image"
        )
    return fallback_h, fallback_w


def image_size(path: str | Path) -> tuple[int, int]:
    """(height, width) of an image file from its header; ValueError if it is not an image."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"workload.image_path={str(path)!r} does not exist")
    try:
        with Image.open(path) as image:
            image.verify()
            return image.height, image.width
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise ValueError(
            f"workload.image_path={str(path)!r} is not a readable image ({exc}); use a PNG or JPEG file"
        ) from None
    except Image.DecompressionBombError as exc:  # PIL's guard against images too large to decode
        raise ValueError(
            f"workload.image_path={str(path)!r} is too large to decode ({exc}); "
            "downscale it first (the output is at most workload.size)"
        ) from None


def reference_pixels(path: str | Path, height: int, width: int) -> np.ndarray:
    """(height, width, 3) float32 in [-1, 1]: the image's shorter side resized (bilinear) to
    min(height, width), the longer by the same factor (truncated), then the centre
    height x width cut out; where the resized image is smaller it is padded with black (-1)."""
    from PIL import Image

    image_size(path)  # the clear errors
    short = min(height, width)
    with Image.open(path) as opened:
        if opened.width * opened.height > DOWNSCALE_ON_READ_FACTOR * height * width:
            scale = short / min(opened.width, opened.height)
            opened.draft("RGB", (int(opened.width * scale) + 1, int(opened.height * scale) + 1))
        image = opened.convert("RGB")
    if image.width <= image.height:
        new_w, new_h = short, int(short * image.height / image.width)
    else:
        new_w, new_h = int(short * image.width / image.height), short
    pixels = np.asarray(image.resize((new_w, new_h), Image.BILINEAR), dtype=np.uint8)
    pad_top, pad_left = max(height - new_h, 0) // 2, max(width - new_w, 0) // 2
    pad_bottom, pad_right = max(height - new_h + 1, 0) // 2, max(width - new_w + 1, 0) // 2
    pixels = np.pad(pixels, ((pad_top, pad_bottom), (pad_left, pad_right), (0, 0)))
    top = int(round((pixels.shape[0] - height) / 2.0))
    left = int(round((pixels.shape[1] - width) / 2.0))
    crop = pixels[top : top + height, left : left + width]
    return crop.astype(np.float32) / 127.5 - 1.0


# ------------------------------------------------------------------------------ video
def write_video(
    path: str | Path, frames: np.ndarray, fps: int, audio: Optional[np.ndarray], sample_rate: int = SAMPLE_RATE
) -> Path:
    """Write (T, H, W, 3) uint8 frames as H.264 (yuv420p) at ``fps`` into an mp4, with the mono
    float waveform ``audio`` muxed in as AAC (cut or zero-padded to the video's duration).

    Written into a temporary file beside ``path`` and renamed, so a video that could not be
    written whole (a full disk) leaves no file; that raises WriteError naming the video."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        _encode_video(tmp, np.ascontiguousarray(frames), fps, audio, sample_rate)
        os.replace(tmp, path)
    except OSError as exc:  # PyAV's errors of the file system are OSErrors with their errno
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise write_error(path, exc) from exc
    return path


def _encode_video(path: Path, frames: np.ndarray, fps: int, audio: Optional[np.ndarray], sample_rate: int) -> None:
    import av

    with av.open(str(path), "w", format="mp4") as container:
        video = container.add_stream("libx264", rate=fps)
        video.width, video.height, video.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        sound = None
        if audio is not None:
            sound = container.add_stream("aac", rate=sample_rate)
            sound.layout = "mono"
        for index, frame in enumerate(frames):
            beat(f"video frame {index + 1}/{len(frames)}")
            container.mux(video.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(video.encode(None))
        if sound is not None:
            n = round(len(frames) * sample_rate / fps)
            samples = np.zeros(n, np.float32)
            samples[: min(n, audio.size)] = audio[:n]
            for start in range(0, n, AUDIO_FRAME_SAMPLES):
                chunk = samples[start : start + AUDIO_FRAME_SAMPLES][None]
                frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout="mono")
                frame.sample_rate, frame.pts, frame.time_base = sample_rate, start, Fraction(1, sample_rate)
                container.mux(sound.encode(frame))
            container.mux(sound.encode(None))


def wants_video(workload: Any, checkpoint_dir: Optional[str]) -> bool:
    """``workload.save_video``: true/false, or auto = when a checkpoint folder is given."""
    setting = str(workload.save_video).lower()
    return setting == "true" or (setting == "auto" and bool(checkpoint_dir))
