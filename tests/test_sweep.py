"""Sweeps on a local Dask cluster: the reports match a sequential run's, a failed or killed task leaves the others and the
earlier reports intact and is listed, `--resume` skips what is done, reports are written only by the client."""
import json, os, sys
from pathlib import Path
import pytest
import yaml
from conftest import REPO, cache_at
from ptmq.runner import run_all
from ptmq.sweep import sweep, receive, run_task

pytest.importorskip('distributed')
TINY = ['ptmq.iters=2', 'calib_images=64', 'deploy.onnx=false']

def _params(folder: Path, names=('tiny_a', 'tiny_b')) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    base = yaml.safe_load((REPO / 'params' / 'default.yaml').read_text())
    for i, n in enumerate(names): (folder / f'{n}.yaml').write_text(yaml.safe_dump({**base, 'name': n, 'calib_seed': i}))
    return folder

def _top1(reports: Path, name: str) -> dict:
    r = json.loads((reports / name / 'results.json').read_text())
    return {(x['method'], x['a_bits']): x['top1'] for x in r['results']}

@pytest.fixture(scope='module')
def swept(tmp_path_factory, digits_seed):
    tmp = tmp_path_factory.mktemp('sweep')
    with cache_at(tmp / 'cache', digits_seed):
        folder = _params(tmp / 'params')
        seq = run_all(folder, reports=tmp / 'seq', overrides=TINY, threads=1)
        par = run_all(folder, reports=tmp / 'par', overrides=TINY, workers=2, threads=1)
        yield tmp, folder, seq, par

def test_a_two_worker_sweep_matches_the_sequential_run(swept):
    tmp, folder, seq, par = swept
    assert seq == par == {'tiny_a': 'done', 'tiny_b': 'done'}
    for n in ('tiny_a', 'tiny_b'):
        assert _top1(tmp / 'seq', n) == _top1(tmp / 'par', n)
        files = {p.name for p in (tmp / 'par' / n).iterdir()}
        assert {'report.html', 'report.ipynb', 'results.json', 'model.safetensors'} <= files and 'progress.log' not in files
    assert 'tiny_a/report.html' in (tmp / 'par' / 'README.md').read_text()
    assert not [p for p in (tmp / 'par').iterdir() if p.name.startswith('.')]        # no half-written folders

def test_resume_with_a_cluster_skips_what_is_done(swept):
    tmp, folder, _, _ = swept
    assert run_all(folder, resume=True, reports=tmp / 'par', overrides=TINY, workers=2) == {'tiny_a': 'skipped', 'tiny_b': 'skipped'}

def _fail_b(params_text, file_name, *args):
    if file_name.startswith('tiny_b'): raise RuntimeError('boom in tiny_b')
    return run_task(params_text, file_name, *args)

def _die_b(params_text, file_name, *args):
    if file_name.startswith('tiny_b'): os._exit(3)                                 # the worker process dies
    return run_task(params_text, file_name, *args)

@pytest.mark.parametrize('task, error', [(_fail_b, 'RuntimeError: boom in tiny_b'), (_die_b, 'KilledWorker')])
def test_a_failed_or_killed_task_leaves_the_others_and_earlier_reports(swept, task, error, tmp_path):
    import cloudpickle
    cloudpickle.register_pickle_by_value(sys.modules[__name__])                     # the workers cannot import this test file
    tmp, folder, _, _ = swept
    reports = tmp_path / 'reports'
    (reports / 'tiny_b').mkdir(parents=True); (reports / 'tiny_b' / 'results.json').write_text('{"earlier": true}')
    status = sweep(sorted(folder.glob('*.yaml')), reports, TINY, workers=2, threads=1, progress=False, task=task)
    assert status['tiny_a'] == 'done' and status['tiny_b'].startswith('failed:') and error in status['tiny_b']
    assert _top1(reports, 'tiny_a') == _top1(tmp / 'seq', 'tiny_a')
    assert (reports / 'tiny_b' / 'results.json').read_text() == '{"earlier": true}'   # the earlier report is untouched

def test_receive_writes_atomically_and_refuses_paths_outside(tmp_path):
    assert receive({'ok': True, 'files': {'results.json': b'{}', 'sub/x.png': b'p'}}, tmp_path, 'a') == 'done'
    assert (tmp_path / 'a' / 'sub' / 'x.png').read_bytes() == b'p'
    with pytest.raises(ValueError, match='outside its report folder'): receive({'ok': True, 'files': {'../x': b''}}, tmp_path, 'b')
    with pytest.raises(ValueError, match='without results.json'): receive({'ok': True, 'files': {'x.png': b''}}, tmp_path, 'a')
    assert (tmp_path / 'a' / 'sub' / 'x.png').is_file() and not (tmp_path / 'b').exists()   # a bad reply changes nothing
    assert receive({'ok': False, 'error': 'E: x', 'failed_notebook': b'{}'}, tmp_path, 'c') == 'failed: E: x'
    assert (tmp_path / 'c.FAILED.ipynb').read_bytes() == b'{}'
    with pytest.raises(ValueError, match='exactly one of workers'): sweep([], tmp_path)
