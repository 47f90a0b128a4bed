"""FuseLab baselines."""
