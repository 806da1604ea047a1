"""Step 6, inference: prompts and text-to-video generation with a LoRA-MoE."""
