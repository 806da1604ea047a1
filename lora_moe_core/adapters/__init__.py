"""Adapters: LoRA and fused LoRA-MoE layers, routing, the adapter networks, checkpoint and export."""
