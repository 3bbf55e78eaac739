"""Parameter schema, the papermill pipeline (`ptmq run`), resume and the atomic-write guarantee, on the offline default."""
import json, os, shutil
from pathlib import Path
import pytest
import yaml
from conftest import REPO
from ptmq.experiment import load_params, ParamsError, parse_overrides, expand, work_from_repo_root
from ptmq.cli import run, run_all, is_done, main, write_index

DEFAULT = REPO / 'params' / 'default.yaml'

@pytest.fixture
def write(tmp_path):
    def _write(d, name='exp.yaml'):
        p = tmp_path / name; p.write_text(yaml.safe_dump(d)); return p
    return _write

BASE = {'name': 't', 'model': 'digits_resnet8', 'calib_data': 'builtin:digits/train', 'eval_data': 'builtin:digits/test'}

@pytest.mark.parametrize('change,pattern', [
    ({'colour': 'red'}, r"unknown key 'colour'; known keys: .*calib_data"),
    ({'ptmq': {'w_bits': 9}}, r"key 'ptmq': w_bits must be an integer in 2\.\.8"),
    ({'ptmq': {'groups': {'low': [4], 'mid': [6], 'high': [9]}}}, r"key 'ptmq': bit group high=\(9,\): bit-widths must be in 2\.\.8"),
    ({'ptmq': {'groups': {'low': [6], 'mid': [4], 'high': [8]}}}, r"key 'ptmq': bit groups must be ordered low < mid < high"),
    ({'ptmq': {'iterations': 5}}, r"key 'ptmq': unknown PTMQ config key\(s\) \['iterations'\]"),
    ({'model': 'resnet9000'}, r"key 'model': unknown model 'resnet9000'; choose one of"),
    ({'calib_data': 'no/such/folder'}, r"key 'calib_data': data folder not found: .*no/such/folder; fix the path or set data_root"),
    ({'weights': 'missing.pth'}, r"key 'weights': weights file not found: .*missing.pth"),
    ({'calib_images': 0}, r"key 'calib_images' must be a positive integer"),
    ({'weights': 'IMAGENET1K_V1'}, r"key 'weights': 'IMAGENET1K_V1' names a torchvision weight set, but digits_resnet8 is not a torchvision model"),
    ({'model': 'resnet50', 'weights': 'IMAGENET1K_V9'}, r"key 'weights': torchvision has no weights 'IMAGENET1K_V9' for resnet50; published: IMAGENET1K_V1"),
])
def test_schema_errors_name_file_key_and_fix(write, change, pattern, monkeypatch, tmp_path):
    monkeypatch.setenv('PTMQ_CACHE', str(tmp_path / 'cache'))
    f = write({**BASE, **change})
    with pytest.raises(ParamsError, match=pattern) as e: load_params(f)
    assert str(f) in str(e.value)

def test_overrides_env_defaults_and_missing_file(write, monkeypatch, tmp_path):
    monkeypatch.setenv('PTMQ_CACHE', str(tmp_path / 'cache'))
    v1 = load_params(write({**BASE, 'model': 'resnet50', 'weights': 'IMAGENET1K_V1'}))       # a weight set's name is no file to check
    assert v1.weights_source() == 'IMAGENET1K_V1' and load_params(write({**BASE, 'weights': 'w/x.pth'}), check_paths=False).weights_source() == Path('w/x.pth')
    p = load_params(write(BASE), ['ptmq.iters=7', 'ptmq.groups={low: [2], mid: [3], high: [4]}', 'calib_images=64'])
    assert p.ptmq.iters == 7 and p.ptmq.a_bits == (2, 3, 4) and p.calib_images == 64
    assert parse_overrides(['a.b=[1, 2]']) == {'a.b': [1, 2]}
    with pytest.raises(ParamsError, match='not key=value'): parse_overrides(['oops'])
    monkeypatch.delenv('PTMQ_NOPE', raising=False)
    assert expand('${PTMQ_NOPE:-/x}/y') == '/x/y'
    with pytest.raises(ParamsError, match='PTMQ_NOPE is not set'): expand('${PTMQ_NOPE}/y')
    with pytest.raises(ParamsError, match='parameter file not found'): load_params(tmp_path / 'nope.yaml')
    assert main(['run', str(tmp_path / 'nope.yaml')]) == 2

def test_every_committed_params_file_is_valid():
    for f in sorted((REPO / 'params').rglob('*.yaml')):
        p = load_params(f, check_paths=False)
        assert p.name and p.ptmq.a_bits

@pytest.fixture(scope='module')
def pipeline(tmp_path_factory):
    "One papermill run of the default with a tiny iteration count, in a scratch reports folder."
    tmp = tmp_path_factory.mktemp('pipeline')
    old = os.environ.get('PTMQ_CACHE'); os.environ['PTMQ_CACHE'] = str(tmp / 'cache')
    try:
        reports = tmp / 'reports'
        out = run(DEFAULT, ['ptmq.iters=3', 'calib_images=128'], reports)
        yield reports, out
    finally:
        if old is None: os.environ.pop('PTMQ_CACHE', None)
        else: os.environ['PTMQ_CACHE'] = old

def test_papermill_run_produces_every_report_file(pipeline):
    reports, out = pipeline
    assert out == reports / 'default_digits_resnet8_w3'
    for f in ('report.ipynb', 'report.html', 'results.json', 'loss_curves.png', 'loss_history.csv'):
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    r = json.loads((out / 'results.json').read_text())
    assert {'name', 'model', 'dataset', 'fp32_top1', 'results', 'calibration', 'params', 'version', 'git_commit'} <= set(r)
    assert {'images', 'iters_per_block', 'seconds', 'device'} <= set(r['calibration'])
    assert r['calibration']['images'] == 128 and r['calibration']['iters_per_block'] == 3
    rows = {(x['method'], x['a_bits']) for x in r['results']}
    assert {('ptmq', 2), ('ptmq', 3), ('ptmq', 4), ('rtn', 2), ('fp32', 32)} <= rows
    assert all({'w_bits', 'a_bits', 'method', 'top1'} <= set(x) for x in r['results'])
    index = (reports / 'README.md').read_text()
    assert 'default_digits_resnet8_w3/report.html' in index and '| W3A2 |' in index
    assert (reports / 'summary.png').is_file()
    assert not list(reports.glob('.*running*'))

def test_resume_skips_matching_results_only(pipeline):
    reports, _ = pipeline
    assert is_done(DEFAULT, reports, ['ptmq.iters=3', 'calib_images=128'])
    assert not is_done(DEFAULT, reports, ['ptmq.iters=4', 'calib_images=128'])
    folder = DEFAULT.parent
    status = run_all(folder, resume=True, reports=reports, overrides=['ptmq.iters=3', 'calib_images=128'], only=['default'])
    assert status == {'default': 'skipped'}

def test_failed_run_keeps_the_earlier_report(pipeline, tmp_path):
    reports, out = pipeline
    before = (out / 'results.json').read_bytes()
    corrupt = tmp_path / 'corrupt.pth'; corrupt.write_bytes(b'\x00 not a checkpoint')
    with pytest.raises(Exception, match='cannot read weights file'):
        run(DEFAULT, ['ptmq.iters=3', 'calib_images=128', f'weights={corrupt}'], reports)
    assert (out / 'results.json').read_bytes() == before
    assert (reports / 'default_digits_resnet8_w3.FAILED.ipynb').is_file()
    assert not list(reports.glob('.*running*'))
    assert 'FAILED' in write_index(reports).read_text()

def test_templates_opened_from_nbs_work_from_the_repo_root(monkeypatch, tmp_path):
    monkeypatch.chdir(REPO / 'nbs'); work_from_repo_root()
    assert Path.cwd() == REPO
    monkeypatch.chdir(tmp_path); work_from_repo_root()       # anywhere else: left where it is
    assert Path.cwd() == tmp_path
