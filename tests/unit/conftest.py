"""The unit tests' shared helpers: this folder on sys.path, so test files import local_engine."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
