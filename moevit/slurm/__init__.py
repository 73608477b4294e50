"""SLURM launch: rendering slurm/train.sbatch (sbatch.py) and the `moevit submit` command (cli.py).

The tasks' side (reading SLURM_PROCID and friends) lives in moevit/parallel/env.py; preemption
(USR2 -> checkpoint -> `scontrol requeue`) in moevit/train/preemption.py.
"""
