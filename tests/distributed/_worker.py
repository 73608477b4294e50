"""Child-process entry of the distributed tests: run one worker function as one rank.

Usage (by conftest.run_workers): python _worker.py MODULE_FILE FUNCTION KWARGS_PT RESULT_PT
The launcher sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT.
"""

import importlib.util
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)


def main(module_file: str, function: str, kwargs_path: str, result_path: str) -> None:
    sys.path.insert(0, str(Path(module_file).parent))  # the test file's helpers (engine_fixtures)
    spec = importlib.util.spec_from_file_location("distributed_test_module", module_file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    kwargs = torch.load(kwargs_path, weights_only=False)
    result = getattr(module, function)(**kwargs)
    torch.save(result, result_path)
    # As the CLI's workers do (moevit.parallel.setup.shutdown_distributed): gloo groups left to the
    # interpreter's exit made one rank abort there now and then ("terminate called without an active
    # exception"), failing a test whose work had passed.
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
