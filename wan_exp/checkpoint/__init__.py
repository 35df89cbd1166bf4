"""A random-weight checkpoint folder in the official Wan2.2-S2V-14B layout, so that upstream's
generate.py (workload=upstream) and wan-exp can be run and measured without the download:
``python -m wan_exp.checkpoint write model=s2v_14b out=<dir>`` (wan_exp.checkpoint.writer).

docs/upstream.md, "A random-weight folder", says what is random and what such a folder can
and cannot tell.
"""
