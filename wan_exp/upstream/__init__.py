"""workload=upstream: the public Wan2.2 ``generate.py --task s2v-14B`` under wan-exp's launcher.

- :mod:`wan_exp.upstream.command`: which of upstream's flags a job's strategy and workload
  settings give, and the flags a checkout's generate.py declares (read from its source, never run);
- :mod:`wan_exp.upstream.preflight`: the checks before launch (checkout, flags, checkpoint files);
- :mod:`wan_exp.upstream.runner`: the rank entry point that runs upstream's script (heartbeats
  from its progress output, the ``fsdp_fixed`` patch of its FSDP wrapping);
- :mod:`wan_exp.upstream.monitor`: what the host measures from outside (NVML, host RSS, the
  output video) and adds to the rank records.

docs/upstream.md says what is measured and how.
"""
