"""``python -m sft_kernels``: the ``sft`` command."""
import sys

from .cli import main

sys.exit(main())
