import sys

from lora_moe_core.cli import main

sys.exit(main())
