"""The pruning study: `sweep` runs it, `report` compares its runs, `benchmark` times any checkpoint."""
