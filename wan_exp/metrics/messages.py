"""How the comm counter keys one message size, read back by the pricing (no torch import).

A key is ``"<bytes>x<bus factor>"``: the call's nccl-tests size and the factor that turns it
into the bytes its rank moves over its busiest link (metrics/comm.py), so a link curve can
price every size on its own (plan/pricing.py).
"""

from __future__ import annotations


def message_key(nbytes: int, bus_factor: float) -> str:
    return f"{nbytes}x{bus_factor:.6g}"


def parse_message_key(key: str) -> tuple[int, float]:
    """``message_key``'s inverse: (bytes, bus factor)."""
    nbytes, _, factor = key.partition("x")
    return int(nbytes), float(factor)
