"""Shared test helpers. Tests that need the real data and weights find them through `shared_dir()`:
$PTMQ_SHARED if set, else ../shared beside the repository; they skip with a reason when it is absent."""
import os
from contextlib import contextmanager
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

@pytest.fixture(scope='session')
def digits_seed() -> Path:
    """The session's ptmq cache (`$PTMQ_CACHE`, else ~/.cache/ptmq) with the digits images and the digits ResNet-8 made
    there once. Tests that need an empty cache of their own (a fresh benchmark cache, a first run) start from links to these
    two instead of training the model again."""
    from ptmq.digits import cache_dir, digits_resnet8
    digits_resnet8()
    return cache_dir()

@contextmanager
def cache_at(path: Path, seed: Path):
    "`$PTMQ_CACHE` set to a new cache at `path` that shares `seed`'s digits images and model (links), restored afterwards."
    path.mkdir(parents=True, exist_ok=True)
    for name in ('digits', 'digits_resnet8.pth'): (path / name).symlink_to(seed / name)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv('PTMQ_CACHE', str(path))
        yield path

@pytest.fixture
def fresh_cache(tmp_path, digits_seed) -> Path:
    "A cache of the test's own under `tmp_path` (nothing cached but the digits data and model) as `$PTMQ_CACHE`."
    with cache_at(tmp_path / 'cache', digits_seed) as path: yield path
