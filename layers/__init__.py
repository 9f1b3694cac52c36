"""Building blocks shared by both stages (imports torch only, never a stage)."""
