import io
import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

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


def write_runs_zip(path: Path, n_runs=3, n_way=5, prefix="", shuffle_seed=0, lines=None):
    """Runs whose training image j is a bar at column band j; each test image repeats the
    bar of the class ``class_labels.txt`` gives it (a permutation of the classes)."""
    rng = np.random.default_rng(shuffle_seed)
    width = 105 // n_way
    with zipfile.ZipFile(path, "w") as zf:
        for r in range(1, n_runs + 1):
            run = f"run{r:02d}"
            answer = rng.permutation(n_way)
            for j in range(n_way):
                bar = np.full((105, 105), 255, np.uint8)
                bar[:, j * width:(j + 1) * width] = 0
                img = Image.fromarray(bar).convert("1")
                out = io.BytesIO()
                img.save(out, "PNG")
                zf.writestr(f"{prefix}{run}/training/class{j + 1:02d}.png", out.getvalue())
            for k in range(n_way):
                bar = np.full((105, 105), 255, np.uint8)
                j = answer[k]
                bar[10:95, j * width:(j + 1) * width] = 0       # drawn a little shorter
                out = io.BytesIO()
                Image.fromarray(bar).convert("1").save(out, "PNG")
                zf.writestr(f"{prefix}{run}/test/item{k + 1:02d}.png", out.getvalue())
            text = lines if lines is not None else "".join(
                f"{run}/test/item{k + 1:02d}.png {run}/training/class{answer[k] + 1:02d}.png\n"
                for k in range(n_way))
            zf.writestr(f"{prefix}{run}/class_labels.txt", text)
    return path
