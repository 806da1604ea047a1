"""The ``lora-moe`` command line: a thin layer that parses flags and calls typed library functions."""
