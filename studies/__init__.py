"""FuseLab studies."""
