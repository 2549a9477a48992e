"""HF <-> megatron-core checkpoint conversion (pure weight mappings per family + the commands)."""
