"""The story tests share `stories.py` (the platform and the ways its users reach it)."""

import sys
from pathlib import Path

# --import-mode=importlib keeps test directories off sys.path.
sys.path.insert(0, str(Path(__file__).parent))
