"""Analysis: statistics over repeated runs, comparison tables, estimates (no training here)."""
