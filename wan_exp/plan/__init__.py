"""The rehearsal side: GPUs you do not have.

run (``python -m wan_exp.plan``: simulated jobs of every preset and GPU count -> a table),
pricing (collectives priced at a link), fake_collectives (simulated ranks' collectives
deliver realistic data).
"""
