"""Parallel strategies: how the model is split over ranks.

Start at registry.py (``setup_parallel``, the strategy table); dims.py resolves and checks
the degrees (cfg, fsdp, ring, ulysses) and builds the named device mesh, ulysses.py splits
the sequence (Ulysses, ring attention from ring.py, or both), cfg.py runs the two guidance
forwards on two rank groups, fsdp.py is parameter sharding, materialise.py reads each
rank's weights.
"""
