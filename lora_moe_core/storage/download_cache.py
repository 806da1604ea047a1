"""Where ``s3://`` inputs (model files and folders, latent caches) are downloaded: ``$LORA_MOE_CACHE``.

The default is ``~/.cache/lora_moe``. The folder is checked before a download starts, so that a variable naming
a file, or a folder this process cannot write (read-only mount, immutable, no permission), is one line naming
the variable rather than a traceback from deep inside a transfer.
"""

from __future__ import annotations

import os
from pathlib import Path

from lora_moe_core.guards.files import check_output_folder

ENV = "LORA_MOE_CACHE"


def download_folder(part: str) -> Path:
    """``$LORA_MOE_CACHE/<part>`` (``models`` or ``latents``), its root checked writable.

    Raises:
        UserError: the root is a file, under a file, or cannot be written; the message names the variable.
    """
    value = os.environ.get(ENV)
    root = Path(value) if value else Path.home() / ".cache" / "lora_moe"
    what = f"{ENV} (where s3:// inputs are downloaded)" if value else f"the download cache (set {ENV} to move it)"
    check_output_folder(root, what)
    return root / part
