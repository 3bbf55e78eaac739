"""Shared test helpers. Tests that need the real data and weights find them through `shared_dir()`:
$PTMQ_SHARED if set, else ../shared beside the repository; they skip with a reason when it is absent."""
import os
from pathlib import Path
import pytest
import torch

REPO = Path(__file__).resolve().parent.parent

def shared_dir() -> Path:
    return Path(os.environ.get('PTMQ_SHARED', REPO.parent / 'shared')).expanduser()

def need_shared(*parts: str) -> Path:
    "The path under the shared folder, or skip the test with the reason."
    p = shared_dir().joinpath(*parts)
    if not p.exists(): pytest.skip(f"needs {p} (real data/weights; set PTMQ_SHARED to the folder described in ../shared/README.md)")
    return p

@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
