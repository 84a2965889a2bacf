"""``python -m c3a_jax`` is the ``c3a-jax`` command."""

import sys

from c3a_jax.cli import main

sys.exit(main())
