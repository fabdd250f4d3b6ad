"""ShapesWorld tests: make ``import data_prep`` find the converters package (not tests/data_prep)."""

import sys
from pathlib import Path

# tests/ is on sys.path under pytest's default import mode, and tests/data_prep/ would be found as a namespace
# package before the editable install's finder; the repo root first on the path makes the real package win.
_REPO = str(Path(__file__).resolve().parents[2])
if _REPO not in sys.path:
    sys.path.append(_REPO)
if "data_prep" in sys.modules and getattr(sys.modules["data_prep"], "__file__", None) is None:
    del sys.modules["data_prep"]
