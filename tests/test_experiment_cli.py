"""Parameter schema, the papermill pipeline (`ptmq run`), resume and the atomic-write guarantee, on the offline default."""
import json, os, shutil
from pathlib import Path
import pytest
import yaml
from conftest import REPO, cache_at
from ptmq.experiment import load_params, ParamsError, parse_overrides, expand, work_from_repo_root
from ptmq.runner import run, run_all, is_done
from ptmq.cli import main
from ptmq.reports import write_index

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
    ({'deploy': {'onnx': 'yes'}}, r"key 'deploy': onnx must be true or false, got 'yes'"),
    ({'deploy': {'keep': True}}, r"key 'deploy': unknown key\(s\) \['keep'\]; known: save, onnx, check_images, latency_images"),
    ({'deploy': {'check_images': 0}}, r"key 'deploy': check_images must be a positive integer or null"),
])
def test_schema_errors_name_file_key_and_fix(write, change, pattern, fresh_cache):
    f = write({**BASE, **change})
    with pytest.raises(ParamsError, match=pattern) as e: load_params(f)
    assert str(f) in str(e.value)

@pytest.mark.parametrize('name', ['../evil', 'a/b', 'a\\b', '..', '.hidden', 'x..y', '/abs', 'tab\tname', 'ünï', 42])
def test_run_names_are_plain_names_checked_before_any_work(write, name, tmp_path, fresh_cache):
    with pytest.raises(ParamsError, match=r"key 'name': .* is not a plain name; .*no path separator, no '\.\.'"): load_params(write({**BASE, 'name': name}))
    reports = tmp_path / 'reports'
    assert main(['run', str(write({**BASE, 'name': name})), '--reports', str(reports)]) == 2 and not reports.exists()
    with pytest.raises(ParamsError, match='not a plain name'): load_params(write(BASE), ['name=../x'])   # an override is checked too

def test_plain_names_pass(write, fresh_cache):
    for name in ('cifar10_resnet20_w4', 'bench-1.2', 'A0'): assert load_params(write({**BASE, 'name': name})).name == name

def test_overrides_env_defaults_and_missing_file(write, monkeypatch, tmp_path, fresh_cache):
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
def pipeline(tmp_path_factory, digits_seed):
    "One papermill run of the default with a tiny iteration count, in a scratch reports folder."
    tmp = tmp_path_factory.mktemp('pipeline')
    with cache_at(tmp / 'cache', digits_seed):
        reports = tmp / 'reports'
        yield reports, run(DEFAULT, ['ptmq.iters=3', 'calib_images=128'], reports, threads=1)

def test_papermill_run_produces_every_report_file(pipeline):
    reports, out = pipeline
    assert out == reports / 'default_digits_resnet8_w3'
    for f in ('report.ipynb', 'report.html', 'results.json', 'loss_curves.png', 'loss_history.csv'):
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    r = json.loads((out / 'results.json').read_text())
    assert {'name', 'model', 'dataset', 'fp32_top1', 'results', 'calibration', 'params', 'version', 'git_commit'} <= set(r)
    assert {'images', 'iters_per_block', 'seconds', 'device'} <= set(r['calibration'])
    assert r['calibration']['threads'] == 1                                    # threads=1 reached the kernel (OMP_NUM_THREADS)
    assert r['calibration']['images'] == 128 and r['calibration']['iters_per_block'] == 3
    rows = {(x['method'], x['a_bits']) for x in r['results']}
    assert {('ptmq', 2), ('ptmq', 3), ('ptmq', 4), ('rtn', 2), ('fp32', 32)} <= rows
    assert all({'w_bits', 'a_bits', 'method', 'top1'} <= set(x) for x in r['results'])
    index = (reports / 'README.md').read_text()
    assert 'default_digits_resnet8_w3/report.html' in index and '| W3A2 |' in index
    assert (reports / 'summary.png').is_file()
    assert not list(reports.glob('.*running*'))

def test_report_html_hides_code_and_opens_with_name_and_results(pipeline):
    "report.html: no code cell inputs, no raw front matter; the experiment's name, model and results table first; parameters last."
    import re
    _, out = pipeline
    html = (out / 'report.html').read_text()
    body = html[html.index('<body'):]
    assert 'class="highlight' not in body and 'jp-InputPrompt' not in body and 'skip_exec' not in body
    assert 'import logging' not in body and 'load_params(' not in body                 # template code is not shown
    text = re.sub(r'\s+', ' ', re.sub(r'<[^>]+>', ' ', re.sub(r'<(style|script).*?</\1>', '', body, flags=re.S)))
    first = text.index('default_digits_resnet8_w3')
    assert first < text.index('digits_resnet8 on digits') < text.index('round-to-nearest') < text.index('PTMQ (this run)') < text.index('Model and data')
    assert body.index('<table') < body.index('Model and data')                        # the first table is the results table
    assert body.index('<img') < body.index('Model and data')                          # and the main plot comes with it
    assert text.rindex('ptmq.iters') > text.index('Loss curves') and 'skip_exec' not in text
    # the notebook beside it keeps every cell, code included
    assert 'load_params(' in (out / 'report.ipynb').read_text()

def test_run_shows_the_notebook_progress_on_the_terminal(tmp_path, capfd, fresh_cache):
    out = run(DEFAULT, ['ptmq.iters=2', 'calib_images=64', 'deploy.onnx=false', 'rtn=false'], tmp_path / 'reports', progress=True, threads=1, index=False)
    err = capfd.readouterr().err
    assert 'PTMQ:' in err and 'unit 1/5' in err and '100/100' not in err and '10/10' in err      # 5 units x 2 iterations
    assert 'PTMQ W3A2' in err                                                           # the evaluations too
    assert not (out / 'progress.log').exists()

def test_kernel_env_sets_threads_leaves_the_wait_policy_then_restores(monkeypatch):
    from ptmq.runner import kernel_env, cores
    monkeypatch.setenv('OMP_NUM_THREADS', '7'); monkeypatch.delenv('OMP_WAIT_POLICY', raising=False)
    with kernel_env(3, {'X_PTMQ': '1'}):
        assert os.environ['OMP_NUM_THREADS'] == '3' and os.environ['MKL_NUM_THREADS'] == '3' and os.environ['X_PTMQ'] == '1'
        assert 'OMP_WAIT_POLICY' not in os.environ            # PASSIVE waiting made two-thread calibrations 1.5x slower
    assert os.environ['OMP_NUM_THREADS'] == '7' and 'OMP_WAIT_POLICY' not in os.environ and 'X_PTMQ' not in os.environ
    monkeypatch.setenv('OMP_WAIT_POLICY', 'PASSIVE')                # a user's own setting passes through
    with kernel_env(2): assert os.environ['OMP_WAIT_POLICY'] == 'PASSIVE'
    with pytest.raises(ValueError, match='at least 1'):
        with kernel_env(0): pass
    assert 1 <= cores() <= (os.cpu_count() or 1)

def test_xdist_workers_get_disjoint_cores_covering_the_machine():
    from conftest import worker_cores
    split = [worker_cores(f'gw{i}', 2, [0, 1, 2, 3, 4]) for i in range(2)]
    assert split == [{0, 2, 4}, {1, 3}]                                         # disjoint, every core used
    assert [worker_cores(f'gw{i}', 3, [0, 1]) for i in range(3)] == [{0}, {1}, {0}]   # more workers than cores: one each

def test_digits_made_once_when_runs_start_together_on_a_new_cache(tmp_path):
    "Three processes asking for the digits folder at once (a sweep's first tasks): one writes it, the others wait; all see it whole."
    import subprocess, sys
    code = "import sys; from ptmq.digits import digits_folder; print(digits_folder(sys.argv[1]))"
    procs = [subprocess.Popen([sys.executable, '-c', code, str(tmp_path / 'digits')], stdout=subprocess.PIPE, text=True) for _ in range(3)]
    outs = [p.communicate(timeout=300)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0] and set(outs) == {str(tmp_path / 'digits')}
    assert len(list((tmp_path / 'digits').rglob('*.png'))) == 1797 and not (tmp_path / 'digits.tmp').exists()

def test_fair_threads_shares_the_cores_among_live_runs(tmp_path, monkeypatch):
    import torch
    from ptmq.data import fair_threads
    before = torch.get_num_threads()
    try:
        monkeypatch.delenv('PTMQ_RUNS', raising=False)
        assert fair_threads() == before                                         # outside ptmq run: nothing changes
        (tmp_path / f'{os.getpid()}.run').touch()
        assert fair_threads(tmp_path, 4) == 4 and torch.get_num_threads() == 4
        (tmp_path / f'{os.getppid()}.run').touch(); (tmp_path / '999999999.run').touch()   # another live run, and a dead one
        assert fair_threads(tmp_path, 4) == 2 and torch.get_num_threads() == 2 and not (tmp_path / '999999999.run').exists()
        assert fair_threads(tmp_path, 1) == 1                                   # never below one thread
        monkeypatch.setenv('PTMQ_RUNS', str(tmp_path)); monkeypatch.setenv('PTMQ_THREADS', '6')
        (tmp_path / f'{os.getppid()}.run').unlink()
        assert fair_threads() == 6                                              # the other run ended: the share comes back
    finally: torch.set_num_threads(before)

def test_the_run_keeps_a_model_that_loads_and_scores_what_the_report_says(pipeline):
    "`ptmq run` writes model.safetensors; ptmq.load reads it back and scores, at every bit-width, exactly the report's PTMQ top-1."
    import ptmq
    from ptmq.serialize import file_sha256
    from ptmq.data import transform_from_config, image_folder, preload, evaluate
    from ptmq.digits import digits_folder
    from ptmq.blocks import set_bits
    reports, out = pipeline
    r = json.loads((out / 'results.json').read_text())
    [mf] = r['deploy']['model_files']
    assert mf['file'] == 'model.safetensors' and mf['bytes'] == (out / 'model.safetensors').stat().st_size
    assert mf['sha256'] == file_sha256(out / 'model.safetensors') and mf['bytes'] < 0.2 * mf['float32_state_dict_bytes']
    qm = ptmq.load(out / 'model.safetensors')
    meta = qm.metadata
    assert meta['model'] == 'digits_resnet8' and meta['config']['iters'] == 3 and meta['calibration']['images'] == 128
    test = preload(image_folder(digits_folder() / 'test', transform_from_config(meta['data_config'])))
    ptmq_rows = {x['a_bits']: x['top1'] for x in r['results'] if x['method'] == 'ptmq'}
    assert {b: evaluate(set_bits(qm, b), test) for b in qm.a_bits} == ptmq_rows
    checks = {c['a_bits']: c for c in r['deploy']['onnx']}
    assert set(checks) == {2, 3, 4}
    for b, c in checks.items():
        assert c['top1_torch'] == ptmq_rows[b] and c['images'] == len(test) and c['agree'] >= 99.0, c
    assert '## Kept models and their ONNX export' in (reports / 'README.md').read_text()

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

def test_a_run_from_a_kept_model_with_mixed_precision(pipeline):
    "`model_file` reuses the kept calibration (checked first); `mixed_precision` adds plan rows, plots, and plans in the kept model."
    import ptmq
    reports, out = pipeline
    base = ['ptmq.iters=3', 'calib_images=128', f"model_file={out / 'model.safetensors'}"]
    with pytest.raises(ParamsError, match=r"calibrated with other PTMQ settings: iters: file 3, params 4"):
        run(DEFAULT, base + ['ptmq.iters=4', 'name=mp_bad'], reports)
    assert not (reports / 'mp_bad.FAILED.ipynb').exists()                    # refused before any work
    mp = run(DEFAULT, base + ['name=mp', 'rtn=false', 'deploy.onnx=false',
                              'mixed_precision={budgets: [2.5, 3.5], random_plans: 2, sensitivity_images: 32}'], reports)
    r, first = json.loads((mp / 'results.json').read_text()), json.loads((out / 'results.json').read_text())
    uniform = lambda rec: {x['a_bits']: x['top1'] for x in rec['results'] if x['method'] == 'ptmq'}
    assert uniform(r) == uniform(first)                                       # the same model, not a new calibration
    assert r['calibration']['model_file']['sha256'] == ptmq.read_metadata(out / 'model.safetensors')['tensor_sha256']
    assert [x['method'] for x in r['results'] if x['method'].endswith('_mp')] == ['ptmq_mp', 'random_mp', 'random_mp'] * 2
    for x in r['results']:
        if x['method'] in ('ptmq', 'ptmq_mp', 'random_mp'): assert {'avg_a_bits', 'bops', 'plan'} <= set(x)
        if x['method'] == 'ptmq_mp': assert set(x['line_se']) == {'avg_a_bits', 'bops'}   # paired error bars against the uniform line
    assert '| misses beyond 2 s.e. |' in (reports / 'README.md').read_text()
    assert (mp / 'mixed_precision.png').is_file() and (mp / 'sensitivity.png').is_file() and not (mp / 'loss_curves.png').exists()
    kept = ptmq.load(mp / 'model.safetensors')
    assert set(kept.plans) == {'avg_bits_2.5', 'avg_bits_3.5'} and kept.sensitivity.kl.shape == (len(kept.plans['avg_bits_2.5']), 3)
    assert '## Mixed precision from one calibration' in (reports / 'README.md').read_text()
