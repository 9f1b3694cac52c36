"""tokenforge: tokenforge."""
