import sys

from lora_moe_core.cli.main import main

sys.exit(main())
