"""File formats shared by every stage: LoRA interchange (musubi, ComfyUI, diffusers) and checked safetensors IO."""
