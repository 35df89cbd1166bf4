"""The rank side: one process per rank, started by the host's agent.

worker (a rank start to end), runtime (rank, device, phases, steps), faults (injected
failures), numerics (non-finite checks). The rank runs the workloads, parallel, models and
metrics packages.
"""
