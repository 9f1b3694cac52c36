"""tokenforge: stage2."""
