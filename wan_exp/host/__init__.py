"""The host side: what runs in the launching process and beside it on each host.

job (one job on its host: the Hydra task), agent (this host's elastic agent), callbacks
(the sweep: record, resume, batch check, dashboard, exit status), progress (live table),
envvars (the ranks' environment), disk (what a sweep will write against the free space),
hydra_errors (Hydra's own errors at launch as one line). No torch is imported here.
"""
