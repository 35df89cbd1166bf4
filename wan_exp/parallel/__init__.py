"""Parallel strategies: how the model is split over ranks.

Start at registry.py (``setup_parallel``, the strategy table); mesh.py turns degrees into
named device-mesh axes, ulysses.py is sequence parallelism, fsdp.py is parameter sharding,
materialise.py reads each rank's weights.
"""
