"""`python -m moevit.cli`: the entry point local launchers (torchrun, DeepSpeed's) and SLURM's srun run."""

import sys

from moevit.cli import main

sys.exit(main())
