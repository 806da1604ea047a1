"""LoRA mixture of experts for WAN2.2."""
