"""The WAN2.2 model: task shapes and targets, loading real or tiny weights, memory modes, the instrument classifier."""
