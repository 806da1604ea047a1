"""One validation layer per input kind, shared by the CLI, the components and the library.

``files``: user files are regular files (never a FIFO or a device) and outputs never overwrite inputs;
``text``: captions and prompts hold no control, bidi-override or surrogate characters; ``parse``: JSON and TOML
readers with depth, size and number limits. Each failure is one :class:`~lora_moe_core.errors.UserError` line.
This package imports nothing from the library's subpackages, so every layer may use it.
"""
