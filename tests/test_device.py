"""Device selection, the host-memory cache path (identical results), the GPU check on a tiny CPU run, and (with CUDA) the GPU path."""
import json, math, shutil
import pytest, torch
from ptmq.recon import PTMQConfig, ptmq
from ptmq.mfm import BitGroups
from ptmq.models import create_model
from ptmq.blocks import set_bits
from ptmq.reports import write_index
from conftest import REPO

def test_device_selection(monkeypatch):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    assert PTMQConfig().resolved_device() == torch.device('cpu')
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    assert PTMQConfig().resolved_device() == torch.device('cuda')
    assert PTMQConfig(device='cpu').resolved_device() == torch.device('cpu')      # overridable
    assert PTMQConfig(device='cuda:1').resolved_device() == torch.device('cuda:1')
    with pytest.raises(ValueError, match="device must be auto, cpu or cuda"): PTMQConfig(device='tpu')
    with pytest.raises(ValueError, match="cache must be auto, device or host"): PTMQConfig(cache='disk')

def _tiny(cache, device='cpu', iters=4, **kw):
    torch.manual_seed(0)
    fp = create_model('cifar_resnet20', pretrained=False)
    calib = torch.randn(48, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    cfg = PTMQConfig(iters=iters, batch_size=8, observe_images=16, cache=cache, device=device, **kw)
    return ptmq(fp, calib, cfg, progress=False), calib

def test_host_cache_gives_the_same_calibration():
    "Caches in host memory (gathered per batch) follow the same random stream: the same model as with device caches."
    a, x = _tiny('device')
    b, _ = _tiny('host')
    assert a.calibration.cache_device == 'cpu' and len(b.calibration.loop_seconds) == len(b.units)
    for s_a, s_b in zip(a.state_dict().values(), b.state_dict().values()): assert torch.equal(s_a, s_b)
    with torch.no_grad(): assert torch.equal(set_bits(a, 4)(x), set_bits(b, 4)(x))

def test_gpu_check_tiny_on_cpu_and_clear_error_without_cuda(tmp_path, monkeypatch):
    from ptmq.gpucheck import time_model, gpu_check, finish_gpu_check, gpu_check_plan
    from ptmq.cli import main
    r = time_model('cifar_resnet20', images=32, iters=2, paper_iters=100, batch_size=8, input_size=32, device='cpu')
    assert r['units'] == 11 and len(r['seconds_per_iter']) == 11 and all(s > 0 for s in r['seconds_per_iter'][:-1])
    full = sum(r['unit_overhead_seconds']) + sum(s * 100 for s in r['seconds_per_iter'])
    assert r['extrapolated_minutes'] == pytest.approx(full / 60, abs=0.06) and r['peak_gpu_gib'] is None
    out = gpu_check(['cifar_resnet20'], tmp_path / 'gc', images=16, iters=1, paper_iters=10, batch_size=8, input_size=32, device='cpu',
                    progress=False, amp=(False,), warmup=False)
    rec = json.loads((out / 'results.json').read_text())
    assert [(r['method'], r['bits']) for r in rec['results']] == [('ptmq', [4, 6, 8]), ('qdrop', [4]), ('qdrop', [6]), ('qdrop', [8])]
    (c,) = rec['qdrop_ratios']
    assert c['qdrop_seconds'] == pytest.approx(sum(r['measured_seconds'] for r in rec['results'][1:]), abs=0.02)
    assert c['ratio'] == pytest.approx(rec['results'][0]['measured_seconds'] / c['qdrop_seconds'], abs=2e-3)
    assert c['paper_ratio'] == pytest.approx(rec['results'][0]['extrapolated_seconds'] / sum(r['extrapolated_seconds'] for r in rec['results'][1:]), abs=2e-3)
    md = (out / 'README.md').read_text()
    assert '| cifar_resnet20 | PTMQ, three passes per step | cpu | 11 |' in md and '| cifar_resnet20 | QDrop | cpu | 11 |' in md and f"**{c['ratio']:.2f}**" in md
    # the index lists the GPU check in its own section beside the experiments, and leaves out a record it does not know
    shutil.copytree(REPO / 'reports' / 'default_digits_resnet8_w3', tmp_path / 'default_digits_resnet8_w3', ignore=shutil.ignore_patterns('*.html', '*.ipynb'))
    (tmp_path / 'odd').mkdir(); (tmp_path / 'odd' / 'results.json').write_text('{"hello": 1}')
    index = write_index(tmp_path).read_text()
    p = rec['results'][0]
    assert f"| [gc](gc/README.md) | cifar_resnet20 | cpu | no | **{p['extrapolated_minutes']}** (10 it/unit) | - | {c['paper_ratio']:.2f} |" in index
    assert '| [default_digits_resnet8_w3](default_digits_resnet8_w3/report.html) | digits_resnet8 | digits | W3A3 |' in index
    assert 'odd' not in index and (tmp_path / 'summary.png').is_file()
    with pytest.raises(ValueError, match='qdrop needs single_bits in'): time_model('cifar_resnet20', images=8, iters=1, input_size=32, device='cpu', method='qdrop')
    with pytest.raises(ValueError, match='unknown method'): time_model('cifar_resnet20', method='adaround', device='cpu')
    # an interrupted check: its work folder keeps the plan and the rows measured; --finish reports what it measured and names the rest
    work = tmp_path / '.gc.running-1'; work.mkdir()
    (work / 'plan.json').write_text(json.dumps(gpu_check_plan(['cifar_resnet20'], (False,))))
    (work / 'rows.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rec['results'][:2]))
    assert main(['gpu-check', '--finish', str(work), '--out', str(tmp_path / 'part')]) == 0      # plan.json wins over the default --models
    part = json.loads((tmp_path / 'part' / 'results.json').read_text())
    assert part['results'] == rec['results'][:2] and part['qdrop_ratios'] == [] and part['torch'] == torch.__version__
    assert part['not_measured'] == ['cifar_resnet20 QDrop A6', 'cifar_resnet20 QDrop A8']
    md = (tmp_path / 'part' / 'README.md').read_text()
    assert '**Interrupted:** 2 of 4 calibrations measured; not measured: cifar_resnet20 QDrop A6, cifar_resnet20 QDrop A8.' in md
    assert 'One PTMQ calibration against' not in md and f'torch {torch.__version__}' in md
    (work / 'plan.json').unlink()           # no plan kept: the one given (the command's --models/--amp/--qdrop)
    assert json.loads((finish_gpu_check(work, tmp_path / 'p2', gpu_check_plan(['cifar_resnet20'], (False,), qdrop=False)) / 'results.json').read_text())['not_measured'] == []
    (work / 'rows.jsonl').write_text('{"model": "cifar_r\n')
    with pytest.raises(ValueError, match='line 1: not a JSON row'): finish_gpu_check(work, tmp_path / 'p3')
    (work / 'rows.jsonl').write_text('')
    with pytest.raises(ValueError, match='holds no rows'): finish_gpu_check(work, tmp_path / 'p3')
    with pytest.raises(FileNotFoundError, match='rows.jsonl not found'): finish_gpu_check(tmp_path / 'nowhere', tmp_path / 'p3')
    assert not (tmp_path / 'p3').exists()
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    with pytest.raises(RuntimeError, match='no CUDA device here'): gpu_check(['resnet18'], tmp_path / 'x')
    assert main(['gpu-check', '--out', str(tmp_path / 'x')]) == 1 and not (tmp_path / 'x').exists()
    with pytest.raises(ValueError, match="unknown model 'resnet9'"): gpu_check(['resnet9'], tmp_path / 'x', device='cpu')

@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')
def test_gpu_calibration_runs_and_agrees_with_cpu_roughly():
    a, x = _tiny('auto', 'cuda')
    b, _ = _tiny('host', 'cuda')
    assert a.calibration.device.startswith('cuda') and b.calibration.cache_device == 'cpu'
    c, _ = _tiny('auto', 'cpu')
    with torch.no_grad():
        ya, yc = set_bits(a, 8)(x.cuda()).cpu(), set_bits(c, 8)(x)
    assert (ya.argmax(1) == yc.argmax(1)).float().mean() > 0.8   # different random streams on the GPU: close, not equal
    from ptmq.data import evaluate
    data = torch.utils.data.TensorDataset(x, ya.argmax(1))
    assert evaluate(set_bits(a, 8), data) == 100.0           # evaluated where the model is (the GPU), by default

@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')
@pytest.mark.parametrize('cache', ['device', 'host'])
def test_gpu_loop_does_not_synchronise_per_iteration(cache):
    "The host syncs of a calibration (flagged by torch's sync debug mode) do not grow with the iterations: the loop never waits for the GPU."
    import warnings
    def syncs(iters):
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter('always')
            torch.cuda.set_sync_debug_mode('warn')
            try: _tiny(cache, 'cuda', iters, log_every=10**6)       # the loss is read at 2 steps a unit
            finally: torch.cuda.set_sync_debug_mode('default')
        return sum('synchroniz' in str(w.message) for w in seen)
    syncs(2)                                   # one-time work (CUDA context, library handles) out of the count
    assert syncs(5) == syncs(30) > 0

def test_amp_runs_the_loop_passes_in_bfloat16_only():
    "`amp=True`: the unit's convolutions run in bfloat16 inside the reconstruction loop, in float32 while caching and observing."
    from ptmq.arch import quantize_model
    from ptmq.recon import calibrate
    torch.manual_seed(0)
    fp = create_model('cifar_resnet20', pretrained=False)
    calib = torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    cfg = PTMQConfig(iters=3, batch_size=8, observe_images=16, amp=True)
    qm = quantize_model(fp, cfg.w_bits, cfg.a_bits)
    seen = []
    qm.units[2].body[0].out_q.register_forward_pre_hook(lambda m, a: seen.append(a[0].dtype))
    res = calibrate(qm, calib, cfg, progress=False)
    per_step = 1 if cfg.resolved_device().type == 'cuda' else 3     # 3 bit passes a step; on a GPU one batched forward (batched_bits)
    assert seen.count(torch.bfloat16) == per_step * cfg.iters and torch.float32 in seen   # caches in float32
    assert all(math.isfinite(h['total']) for h in res.history)
    assert PTMQConfig.from_dict({'amp': True}).to_dict()['amp'] is True and PTMQConfig().amp is False
