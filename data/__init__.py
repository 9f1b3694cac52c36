"""tokenforge: data."""
