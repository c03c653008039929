"""``python -m ckptmap.cli``: the same as the ``ckptmap`` command."""

import sys

from ckptmap.cli import main

sys.exit(main())
