"""tokenforge: metrics."""
