"""FuseLab harness."""
