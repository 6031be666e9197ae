import os
from pathlib import Path

import pytest


def omniglot_root() -> str:
    """The real Omniglot subsets: $FASTMTL_OMNIGLOT or ../shared/data/omniglot; else skip."""
    root = os.environ.get("FASTMTL_OMNIGLOT") or str(
        Path(__file__).resolve().parents[2] / "shared" / "data" / "omniglot")
    if not Path(root).is_dir():
        pytest.skip(f"real Omniglot data not found at {root} (set FASTMTL_OMNIGLOT)")
    return root
