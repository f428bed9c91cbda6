"""Command line: `python -m bigs_jax.generate WORKDIR --prompt "..."` (see `bigs_jax.cli_generate`).

The Python API is the function `bigs_jax.generate` (implemented in `bigs_jax.generation`);
this file only makes `python -m bigs_jax.generate` work. Import `bigs_jax.generation`, not
this module: importing it would shadow the function `bigs_jax.generate` with this module.
"""

import sys

from bigs_jax.cli_generate import main

if __name__ == "__main__":
    sys.exit(main())
