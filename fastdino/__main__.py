"""`python -m fastdino ARGS` = `fastdino ARGS`; `torchrun --nproc_per_node=N -m fastdino train ...` launches a run."""
import sys

from fastdino.engine.cli import main

sys.exit(main())
