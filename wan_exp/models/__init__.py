"""The Wan2.2 S2V model: DiT (wan_s2v), attention backends, weight sources, text/audio encoders."""
