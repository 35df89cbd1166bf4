"""The PyTorch caching-allocator string, checked the way torch will read it.

torch parses PYTORCH_ALLOC_CONF (new name) / PYTORCH_CUDA_ALLOC_CONF (old name) at the
first CUDA allocation of a process and raises there on an unknown key or a bad value, so a
typo surfaces only once every rank has loaded its weights. This module finds those errors
up front, and also the settings torch accepts but which do nothing (docs/facts.md §9):
``max_split_size_mb`` next to ``expandable_segments:True``, ``garbage_collection_threshold``
without a per-process memory fraction, native-allocator keys under ``backend:cudaMallocAsync``.

It imports no torch, so the launcher process may use it too.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Callable, Mapping

from packaging.version import Version

from wan_exp.doctor.rows import FAIL, OK, WARN, Row
from wan_exp.host.envvars import ALLOCATOR_NAMES

NEW_NAME, OLD_NAME = ALLOCATOR_NAMES
# The smallest max_split_size_mb / max_non_split_rounding_mb torch accepts (its large-buffer size).
MIN_SPLIT_MB = 20
MAX_PINNED_REGISTER_THREADS = 128


def _is_bool(v: str) -> bool:
    return v in ("True", "False")  # torch is case-sensitive here: "true" is rejected


def _is_int_at_least(minimum: int) -> Callable[[str], bool]:
    return lambda v: v.isdigit() and int(v) >= minimum


def _is_power_of_two(v: str, allow_zero: bool = False) -> bool:
    return v.isdigit() and (int(v) & (int(v) - 1) == 0) and (allow_zero or int(v) > 0)


def _is_float_in(low: float, high: float, high_inclusive: bool) -> Callable[[str], bool]:
    def check(v: str) -> bool:
        try:
            x = float(v)
        except ValueError:
            return False
        return low < x and (x <= high if high_inclusive else x < high)

    return check


def _is_roundup_divisions(v: str) -> bool:
    """A power of two, or a list '[256:1,512:2,>:4]' of interval:divisions pairs."""
    if not (v.startswith("[") and v.endswith("]")):
        return _is_power_of_two(v)
    pairs = [p.split(":") for p in v[1:-1].split(",")]
    return all(
        len(p) == 2 and (p[0] == ">" or _is_power_of_two(p[0])) and _is_power_of_two(p[1], allow_zero=True)
        for p in pairs
    )


# Every key recent torch releases accept, with the rule for its value (as torch checks it).
KEYS: dict[str, tuple[Callable[[str], bool], str]] = {
    "max_split_size_mb": (_is_int_at_least(MIN_SPLIT_MB), f"an integer number of MiB >= {MIN_SPLIT_MB}"),
    "max_non_split_rounding_mb": (_is_int_at_least(MIN_SPLIT_MB), f"an integer number of MiB >= {MIN_SPLIT_MB}"),
    "garbage_collection_threshold": (
        _is_float_in(0.0, 1.0, high_inclusive=False),
        "a fraction strictly between 0 and 1",
    ),
    "roundup_power2_divisions": (_is_roundup_divisions, "a power of two, or [interval:divisions,...,>:divisions]"),
    "expandable_segments": (_is_bool, "True or False (capitalised)"),
    "backend": (lambda v: v in ("native", "cudaMallocAsync"), "native or cudaMallocAsync"),
    "per_process_memory_fraction": (_is_float_in(0.0, 1.0, high_inclusive=True), "a fraction in (0, 1]"),
    "release_lock_on_cudamalloc": (_is_bool, "True or False (capitalised)"),
    "graph_capture_record_stream_reuse": (_is_bool, "True or False (capitalised)"),
    "throw_on_cudamalloc_oom": (_is_bool, "True or False (capitalised)"),
    "pinned_use_cuda_host_register": (_is_bool, "True or False (capitalised)"),
    "pinned_use_background_threads": (_is_bool, "True or False (capitalised)"),
    "pinned_free_catch_all": (_is_bool, "True or False (capitalised)"),
    "pinned_num_register_threads": (
        lambda v: _is_power_of_two(v) and int(v) <= MAX_PINNED_REGISTER_THREADS,
        f"a power of two <= {MAX_PINNED_REGISTER_THREADS}",
    ),
    "pinned_reserve_segment_size_mb": (_is_int_at_least(1), "a positive integer number of MiB"),
    "pinned_max_round_threshold_mb": (_is_int_at_least(0), "an integer number of MiB"),
    "pinned_max_cached_size_mb": (_is_int_at_least(0), "an integer number of MiB"),
}
# What backend:cudaMallocAsync ignores: the native caching allocator's own knobs.
NATIVE_ONLY_KEYS = (
    "max_split_size_mb",
    "max_non_split_rounding_mb",
    "garbage_collection_threshold",
    "roundup_power2_divisions",
    "expandable_segments",
)


@dataclass
class Finding:
    status: str  # FAIL: torch rejects the string; WARN: accepted but (partly) without effect
    message: str
    hint: str


def split_items(conf: str) -> list[str]:
    """'a:1, b:[1:2,>:4]' -> ['a:1', 'b:[1:2,>:4]']: commas inside brackets stay.
    Spaces are dropped, as torch's tokenizer drops them."""
    items, depth, current = [], 0, ""
    for ch in conf.replace(" ", ""):
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            items.append(current)
            current = ""
        else:
            current += ch
    return [item for item in [*items, current] if item]


def parse_allocator_conf(conf: str) -> tuple[dict[str, str], list[Finding]]:
    """The settings of an allocator string (key -> value, the last one winning as in torch)
    and what is wrong with it."""
    settings: dict[str, str] = {}
    findings: list[Finding] = []
    for item in split_items(conf):
        key, colon, value = item.partition(":")
        if key not in KEYS:
            close = difflib.get_close_matches(key, KEYS, n=1)
            findings.append(
                Finding(
                    FAIL,
                    f"unknown key {key!r}",
                    'torch raises "Unrecognized key" at the first CUDA allocation; '
                    + (f"did you mean {close[0]!r}?" if close else f"known keys: {', '.join(KEYS)}"),
                )
            )
            continue
        is_valid, rule = KEYS[key]
        if not colon or not is_valid(value):
            findings.append(
                Finding(
                    FAIL,
                    f"{key}:{value}" if colon else f"{key} without a value",
                    f"torch rejects it: {key} takes {rule}",
                )
            )
            continue
        if key in settings:
            findings.append(
                Finding(WARN, f"{key} given twice ({settings[key]}, then {value})", "the last one wins; keep one")
            )
        settings[key] = value
    return settings, findings + inert_settings(settings)


def inert_settings(settings: Mapping[str, str]) -> list[Finding]:
    """Settings torch accepts but that have (almost) no effect next to the others."""
    findings = []
    if settings.get("expandable_segments") == "True" and "max_split_size_mb" in settings:
        findings.append(
            Finding(
                WARN,
                "max_split_size_mb is inert with expandable_segments:True",
                "expandable segments grow one mapping instead of splitting cached blocks, so the "
                "split cap has little effect; drop max_split_size_mb or compare both with allocator=... sweeps",
            )
        )
    if "garbage_collection_threshold" in settings and "per_process_memory_fraction" not in settings:
        findings.append(
            Finding(
                WARN,
                "garbage_collection_threshold is inert without a per-process memory fraction",
                "it only acts once usage nears the fraction set by per_process_memory_fraction:<f> "
                "(or torch.cuda.set_per_process_memory_fraction, which wan-exp does not call)",
            )
        )
    if settings.get("backend") == "cudaMallocAsync":
        ignored = [k for k in NATIVE_ONLY_KEYS if k in settings]
        if ignored:
            findings.append(
                Finding(
                    WARN,
                    f"backend:cudaMallocAsync ignores {', '.join(ignored)}",
                    "they configure the native caching allocator only; drop them",
                )
            )
    return findings


def variable_findings(env: Mapping[str, str], torch_version: str | None) -> list[Finding]:
    """Problems with which variable names are set, given the installed torch."""
    new, old = env.get(NEW_NAME), env.get(OLD_NAME)
    findings = []
    if new is not None and old is not None and new != old:
        findings.append(
            Finding(
                WARN,
                f"{NEW_NAME} and {OLD_NAME} differ",
                "torch reads only one of them and which one changed between releases; set both to the "
                "same string (the launcher does this from allocator.conf)",
            )
        )
    if new is not None and old is None and torch_version is not None:
        release = Version(torch_version).release
        if release < (2, 9):
            findings.append(
                Finding(WARN, f"torch {torch_version} does not read {NEW_NAME}", f"set {OLD_NAME} as well (or instead)")
            )
        elif release < (2, 11) and "expandable_segments" in new:
            findings.append(
                Finding(
                    WARN,
                    f"torch {torch_version} may ignore expandable_segments from {NEW_NAME}",
                    f"2.9.1 did (fixed by 2.11); set {OLD_NAME} to the same string",
                )
            )
    return findings


def allocator_rows(env: Mapping[str, str], torch_version: str | None) -> list[Row]:
    rows = [Row("allocator variables", f.status, f.message, f.hint) for f in variable_findings(env, torch_version)]
    names_by_conf: dict[str, list[str]] = {}  # the same string under both names is checked once
    for name in (NEW_NAME, OLD_NAME):
        if name in env:
            names_by_conf.setdefault(env[name], []).append(name)
    for conf, names in names_by_conf.items():
        label = " & ".join(names)
        _, findings = parse_allocator_conf(conf)
        if not findings:
            rows.append(Row(label, OK, repr(conf)))
        rows.extend(Row(label, f.status, f"{conf!r}: {f.message}", f.hint) for f in findings)
    if not rows:
        rows.append(Row("allocator", OK, f"PyTorch defaults ({NEW_NAME} and {OLD_NAME} unset)"))
    return rows
