"""The ownership tests share their membership stories (ownership_scenarios.py)."""

import sys
from pathlib import Path

# --import-mode=importlib keeps test directories off sys.path.
sys.path.insert(0, str(Path(__file__).parent))
