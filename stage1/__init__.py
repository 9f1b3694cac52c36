"""tokenforge: stage1."""
