import os
import tempfile
from pathlib import Path

import pytest

from fastmtl import keep_freed_memory

# ImageFolder caches decoded images; the tests keep theirs out of the user's home.
os.environ.setdefault("FASTMTL_CACHE", tempfile.mkdtemp(prefix="fastmtl-cache-"))
# The CLI's allocator setting for the whole test process, so tests of the Python API run
# their training and embedding at the CLI's speed (the numbers are the same either way).
keep_freed_memory(mmap_threshold=1 << 30)


def omniglot_root() -> str:
    """The real Omniglot subsets: $FASTMTL_OMNIGLOT or ../shared/data/omniglot; else skip."""
    root = os.environ.get("FASTMTL_OMNIGLOT") or str(
        Path(__file__).resolve().parents[2] / "shared" / "data" / "omniglot")
    if not Path(root).is_dir():
        pytest.skip(f"real Omniglot data not found at {root} (set FASTMTL_OMNIGLOT)")
    return root
