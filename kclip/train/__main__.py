"""`python -m kclip.train ...` = `kclip train ...` (the form torchrun launches: `torchrun -m kclip.train`)."""

import sys

from kclip.cli import main

sys.exit(main(["train", *sys.argv[1:]]))
