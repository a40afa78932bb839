"""Stage 1: supervised fine-tuning on teacher traces (off-policy distillation)."""
