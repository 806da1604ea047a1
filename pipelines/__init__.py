"""Kubeflow pipelines of the LoRA-MoE trainer: definitions, compile, local run (kfp.local), SDK submit/schedule.

Importing needs only kfp and kfp-kubernetes (no torch): ``lora-moe pipeline compile`` runs anywhere in seconds.
"""
