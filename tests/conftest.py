"""Shared test helpers. Tests that need the real data and weights find them through `shared_dir()`:
$PTMQ_SHARED if set, else ../shared beside the repository; they skip with a reason when it is absent.
Under pytest-xdist (`-n N`, the README's test command) each worker is pinned to its own share of the cores, so that N workers
and the `ptmq run` kernels they start never oversubscribe the machine."""
import os
from contextlib import contextmanager
from pathlib import Path
import pytest
import torch

REPO = Path(__file__).resolve().parent.parent

def worker_cores(worker: str, count: int, cores: list[int]) -> set[int]:
    "The cores of xdist worker `worker` ('gw0', 'gw1', ...) of `count`: every count-th of `cores` from its index (one at least)."
    i = int(worker.removeprefix('gw'))
    return set(cores[i::count]) or {cores[i % len(cores)]}

def pytest_configure(config):
    worker, count = os.environ.get('PYTEST_XDIST_WORKER'), int(os.environ.get('PYTEST_XDIST_WORKER_COUNT') or 1)
    if worker and count > 1 and hasattr(os, 'sched_setaffinity'):
        mine = worker_cores(worker, count, sorted(os.sched_getaffinity(0)))
        os.sched_setaffinity(0, mine)           # inherited by the kernels `ptmq run` starts, whose threads follow `cores()`
        torch.set_num_threads(len(mine))

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
    digits_resnet8()                      # xdist workers share this cache: one trains, the others wait (a lock in ptmq.digits)
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
