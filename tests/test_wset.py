"""One calibration for several (weight, activation) pairs (issue 16): per-bit weight steps and the shared rounding by hand,
pair groups, switching invariants over (w, a), save/load and export with weight sets, and bad configs."""
import copy, json
import pytest
import torch
from ptmq.quant import WeightQuantizer, observe, weight_set
from ptmq.mfm import PairGroups, parse_pair
from ptmq.recon import PTMQConfig, ptmq, round_to_nearest
from ptmq.blocks import set_bits, weight_quantizers, act_quantizers
from ptmq.models import cifar_resnet
from ptmq.serialize import save, load, read_metadata, model_tensors, _digest, FORMAT
from ptmq.export import export_module
from ptmq.arch import quantize_model

# ---------------------------------------------------------------- the quantizer

def test_per_bit_steps_and_shared_rounding_by_hand():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, 3, 3, 3, generator=g)
    q = WeightQuantizer(w, (8, 3), observer='mse', p=2.4, rounding='shared')
    assert q.bit_set == (3, 8) and q.bits == 8 and q.scales.shape == (2, 4, 1, 1, 1)
    for i, b in enumerate((3, 8)):                                   # one observer step per bit-width, per channel
        s, z = observe(w.reshape(4, -1), b, 'mse', per_channel=True, p=2.4)
        assert torch.equal(q.scales[i].flatten(), s) and torch.equal(q.zero_points[i].flatten(), z)
    s3 = q.scales[0]                                                 # alpha starts at the LOWEST grid's fractions
    assert torch.allclose(q.h(), w / s3 - torch.floor(w / s3), atol=1e-5)
    with torch.no_grad(): q.alpha.copy_(torch.randn(q.alpha.shape, generator=g))
    q.set_mode('hard')
    up = (q.alpha >= 0).float()
    for i, b in enumerate((3, 8)):                                   # the same up/down decision on every grid
        q.idx = i
        s, z = q.scales[i], q.zero_points[i]
        want = (torch.clamp(torch.floor(w / s) + up + z, 0, 2 ** b - 1) - z) * s
        assert torch.equal(q(w), want)
        assert torch.equal(q.codes(w), torch.clamp(torch.floor(w / s) + up + z, 0, 2 ** b - 1).to(torch.uint8))
    soft = WeightQuantizer(w, (3, 8), observer='mse', rounding='lowest')
    with torch.no_grad(): soft.alpha.copy_(q.alpha)
    soft.set_mode('hard')
    soft.idx = 1                                                     # 'lowest': the higher grids round to nearest
    assert torch.equal(soft(w), torch.clamp(torch.round(w / soft.scale) + soft.zero_point, 0, 255).sub(soft.zero_point).mul(soft.scale))
    soft.idx = 0
    assert torch.equal(soft(w), (torch.clamp(torch.floor(w / soft.scale) + up + soft.zero_point, 0, 7) - soft.zero_point) * soft.scale)

def test_per_bit_rounding_by_hand():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(3, 8, generator=g)
    q = WeightQuantizer(w, (3, 4, 8), observer='mse', rounding='per_bit')
    assert q.alpha.shape == (3, 3, 8)
    for i in range(3):                                               # each grid starts at its own fractions
        s = q.scales[i]
        assert torch.allclose(q.h()[i], w / s - torch.floor(w / s), atol=1e-5)
    with torch.no_grad(): q.alpha.copy_(torch.randn(q.alpha.shape, generator=g))
    q.set_mode('hard')
    for i, b in enumerate((3, 4, 8)):
        q.idx = i
        s, z, up = q.scales[i], q.zero_points[i], (q.alpha[i] >= 0).float()
        assert torch.equal(q(w), (torch.clamp(torch.floor(w / s) + up + z, 0, 2 ** b - 1) - z) * s)
    q.set_mode('soft'); q.idx = 1
    assert torch.equal(q(w), (torch.clamp(torch.floor(w / q.scale) + q.h()[1] + q.zero_point, 0, 15) - q.zero_point) * q.scale)

def test_single_bit_quantizer_is_unchanged_and_codes_per_bit():
    w = torch.randn(6, 10)
    one = WeightQuantizer(w, 4)
    assert one.bit_set == (4,) and one.bits == 4 and one.scale.shape == (6, 1)
    two = WeightQuantizer(w, (4, 6))
    two.set_mode('hard'); codes = two.all_codes(w)
    assert codes.shape == (2, 6, 10) and int(codes[0].max()) <= 15 and two.idx == 1     # all_codes leaves the index alone
    ref = [two(w) for two.idx in (0, 1)]
    two.freeze_codes(w)
    for i in (0, 1):
        two.idx = i
        assert torch.equal(two(w), ref[i])

def test_weight_set_errors():
    assert weight_set([8, 3, 4]) == (3, 4, 8)
    for bad, msg in (((), 'integers in 2..8'), ((1, 4), 'integers in 2..8'), ((4, 9), 'integers in 2..8'), ((4, 4), 'repeated'),
                     ((4.0,), 'integers in 2..8')):
        with pytest.raises(ValueError, match=msg): weight_set(bad)
    with pytest.raises(ValueError, match='rounding must be one of'): WeightQuantizer(torch.randn(2, 3), (3, 4), rounding='mean')

# ---------------------------------------------------------------- pairs and configs

def test_pair_groups():
    row = PairGroups.row(['W8A8', 'W3A3', [4, 4], (6, 6)])
    assert (row.low, row.mid, row.high) == (((3, 3),), ((4, 4), (6, 6)), ((8, 8),))
    assert row.w_set == (3, 4, 6, 8) and row.a_bits == (3, 4, 6, 8)
    grid = PairGroups([[4, 4]], [[w, a] for w in (4, 6, 8) for a in (4, 6, 8) if (w, a) not in ((4, 4), (8, 8))], ['W8A8'])
    assert len(grid.pairs) == 9
    g = torch.Generator().manual_seed(0)
    for _ in range(10):
        lo, mid, hi = grid.sample(g)
        assert lo == (4, 4) and mid in grid.mid and hi == (8, 8)
    assert PairGroups(**row.to_dict()) == row and str(row) == 'W3A3 | W4A4,W6A6 | W8A8'

@pytest.mark.parametrize('bad, msg', [
    ({'pairs': ['W3A3', 'W4A4', 'W9A9']}, r'integers in 2\.\.8'),
    ({'pairs': ['W3A3', 'W4A4', 'W1A8']}, r'integers in 2\.\.8'),
    ({'pairs': ['W3A3', 'W4A4']}, 'at least three'),
    ({'pairs': {'low': ['W4A4'], 'mid': ['W6A3'], 'high': ['W8A8']}}, 'rise from low to high'),
    ({'pairs': {'low': ['W4A4'], 'mid': [], 'high': ['W8A8']}}, "'mid' is empty"),
    ({'pairs': ['W3A3', 'W6A6', 'W8A8'], 'w_bits': 4}, r"w_bits must be one of the pairs' weight bit-widths \[3, 6, 8\]"),
    ({'pairs': ['W3A3', 'W4A4', 'W8A8'], 'single_bits': 4}, 'exclude each other'),
    ({'pairs': ['W3A3', 'W4A4', 'W8A8'], 'observe_on': 'quantized'}, "observe_on='float'"),
    ({'pairs': ['W3A3', 'W4A4', 'W8A8'], 'w_rounding': 'avg'}, 'w_rounding must be one of'),
    ({'pairs': ['W3A3', 'W4A4', 'W8A8X']}, "written \\[w, a\\] or 'WwAa'"),
])
def test_bad_pair_configs(bad, msg):
    with pytest.raises((ValueError, TypeError), match=msg): PTMQConfig.from_dict(bad)

def test_config_round_trip():
    cfg = PTMQConfig(pairs=['W3A3', 'W4A4', 'W6A6', 'W8A8'], w_rounding='lowest')
    assert cfg.a_bits == (3, 4, 6, 8) and cfg.w_set == (3, 4, 6, 8) and cfg.passes == [(3, 3), (4, 4), (6, 6), (8, 8)]
    assert PTMQConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert PTMQConfig().w_set == (4,) and PTMQConfig().passes == [4, 6, 8]

# ---------------------------------------------------------------- a calibrated model with a weight set

@pytest.fixture(scope='module')
def wset_model():
    torch.manual_seed(0)
    float_model = cifar_resnet(8, pretrained=False).eval()
    x = torch.randn(48, 3, 32, 32)
    cfg = PTMQConfig(pairs=['W3A3', 'W4A4', 'W6A6', 'W8A8'], iters=3, batch_size=8, observe_images=16, observer='mse', seed=0)
    return ptmq(float_model, x, cfg, progress=False), float_model, x[:6]

PAIRS = [(3, 3), (4, 4), (6, 6), (8, 8)]

def test_wset_calibration_trains_every_pair(wset_model):
    qm, float_model, x = wset_model
    assert qm.w_set == (3, 4, 6, 8) and qm.a_bits == (3, 4, 6, 8) and (qm.w_bits, max(qm.a_bits)) == (8, 8)
    drawn = {p for r in qm.calibration.history for p in r['bits'].split('/')}
    assert drawn == {'W3A3', 'W4A4', 'W6A6', 'W8A8'} or {'W3A3', 'W8A8'} <= drawn
    first_last = [q for q in weight_quantizers(qm) if not q.switchable]
    assert first_last and all(q.bit_set == (8,) for q in first_last)          # first and last layers stay at 8 bits
    with torch.no_grad(): y = float_model(x)
    errs = [(set_bits(qm, a, w=w)(x) - y).abs().mean().item() for w, a in PAIRS]
    assert errs[0] > errs[-1]                                                   # W3A3 further from float than W8A8

def test_switching_over_pairs_is_bit_exact_and_reversible(wset_model):
    qm, _, x = wset_model
    with torch.no_grad():
        ref = {p: set_bits(qm, p[1], w=p[0])(x) for p in PAIRS}
        for p in [(8, 8), (3, 3), (6, 6), (3, 3), (4, 4), (8, 8)]:
            assert torch.equal(set_bits(qm, p[1], w=p[0])(x), ref[p])
        set_bits(qm, 3, w=8); a3w8 = qm(x)
        set_bits(qm, w=3); assert qm.w_bits == 3 and all(q.current_bits == 3 for q in act_quantizers(qm) if q.switchable)
        assert not torch.equal(qm(x), a3w8)
        set_bits(qm, w=8); assert torch.equal(qm(x), a3w8)                    # weights alone switch back
        assert not torch.equal(ref[(3, 3)], ref[(8, 8)])

def test_activation_plans_switch_at_any_calibrated_weight_bit_width(wset_model):
    "Mixed-precision activation plans (18_mixed) combine with the weight switch: bit-exact, reversible, the uniform plan is the uniform switch."
    from ptmq.mixed import BitPlan, current_plan
    qm, _, x = wset_model
    with torch.no_grad():
        uni = set_bits(qm, 4, w=6)(x)
        assert torch.equal(set_bits(qm, BitPlan.uniform(qm, 4), w=6)(x), uni)
        plan = BitPlan(tuple(3 if i % 2 else 8 for i in range(len(current_plan(qm)))))
        out = set_bits(qm, plan, w=4)(x)
        assert current_plan(qm) == plan and qm.w_bits == 4 and not torch.equal(out, set_bits(qm, 8, w=4)(x))
        set_bits(qm, 8, w=8)
        assert torch.equal(set_bits(qm, plan, w=4)(x), out)
    set_bits(qm, 8, w=8)

def test_switching_errors(wset_model):
    qm, _, _ = wset_model
    with pytest.raises(ValueError, match=r'weight bit-width 5 not calibrated in this model; available: \[3, 4, 6, 8\]'): set_bits(qm, 4, w=5)
    with pytest.raises(ValueError, match='needs activation bit-widths, a weight bit-width'): set_bits(qm)
    set_bits(qm, 8, w=8)

def test_save_load_round_trip_with_weight_sets(wset_model, tmp_path):
    qm, _, x = wset_model
    set_bits(qm, 4, w=6)
    save(qm, tmp_path / 'm.safetensors')
    meta = read_metadata(tmp_path / 'm.safetensors')
    assert meta['w_set'] == [3, 4, 6, 8] and meta['w_bits'] == 6 and meta['spec']['w_bits'] == [3, 4, 6, 8]
    assert any(v['bits'] == [3, 4, 6, 8] for v in meta['weights'].values()) and any(v['bits'] == 8 for v in meta['weights'].values())
    back = load(tmp_path / 'm.safetensors')
    assert back.w_bits == 6 and back.w_set == (3, 4, 6, 8)
    with torch.no_grad():
        for w, a in PAIRS + [(3, 8), (8, 3)]:
            assert torch.equal(set_bits(back, a, w=w)(x), set_bits(qm, a, w=w)(x)), (w, a)
    m = export_module(back, 4, w=3)                                           # the deployed module at one (w, a)
    with torch.no_grad(): assert torch.allclose(m(x), set_bits(back, 4, w=3)(x), atol=1e-5)
    with pytest.raises(ValueError, match='weight bit-width 5 is not calibrated'): export_module(back, 4, w=5)
    set_bits(qm, 8, w=8)

def test_format_1_files_still_load(tmp_path):
    "A file of format 1 (one step per layer, `wq.scale`): written here by turning a single-bit model's tensors back into it."
    from safetensors.torch import save_file
    torch.manual_seed(0)
    qm = quantize_model(cifar_resnet(8, pretrained=False).eval(), 4, (4, 6, 8), observer='minmax')
    save(qm, tmp_path / 'new.safetensors')
    tensors, _ = model_tensors(qm)
    old = {}
    for k, v in tensors.items():
        if k.endswith('.wq.scales') or k.endswith('.wq.zero_points'): old[k.rsplit('.', 1)[0] + ('.scale' if k.endswith('scales') else '.zero_point')] = v[0].clone()
        else: old[k] = v
    meta = read_metadata(tmp_path / 'new.safetensors')
    meta.update(format_version=1, tensor_sha256=_digest(old))
    meta['spec'].pop('head_q', None); meta['spec']['head_q'] = 'last'
    save_file(old, str(tmp_path / 'old.safetensors'), metadata={'format': FORMAT, 'format_version': '1', 'ptmq': json.dumps(meta)})
    back = load(tmp_path / 'old.safetensors')
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        for b in (4, 6, 8): assert torch.equal(set_bits(back, b)(x), set_bits(qm, b)(x))

# ---------------------------------------------------------------- through `ptmq run`

def test_ptmq_run_with_pairs_writes_ptmq_wset_rows(tmp_path, fresh_cache):
    "The offline default (digits ResNet-8) as one calibration for W2A2 / W3A3 / W4A4, a few iterations: rows, report, kept model."
    from conftest import REPO
    from ptmq.runner import run
    out = run(REPO / 'params' / 'default.yaml', ['ptmq.iters=2', 'calib_images=64', 'ptmq.pairs=[W2A2, W3A3, W4A4]',
                                                 'deploy.save=true'], tmp_path / 'reports', threads=1)
    rec = json.loads((out / 'results.json').read_text())
    rows = [r for r in rec['results'] if r['method'] == 'ptmq_wset']
    assert [(r['w_bits'], r['a_bits']) for r in rows] == [(2, 2), (3, 3), (4, 4)]
    assert all(r['calib_seconds'] > 0 and 0 <= r['top1'] <= 100 for r in rows)
    assert [(r['w_bits'], r['a_bits']) for r in rec['results'] if r['method'] == 'rtn'] == [(2, 2), (3, 3), (4, 4)]
    assert rec['params']['ptmq']['pairs'] == {'low': [[2, 2]], 'mid': [[3, 3]], 'high': [[4, 4]]}
    assert [(c['w_bits'], c['a_bits']) for c in rec['deploy']['onnx']] == [(2, 2), (3, 3), (4, 4)]
    assert all(c['agree'] >= 99 for c in rec['deploy']['onnx'])                 # onnxruntime at each pair against PyTorch
    back = load(out / 'model.safetensors')
    assert back.w_set == (2, 3, 4)
    from ptmq.export import export_command
    res = export_command(out / 'model.safetensors', 3, w_bits=2)                 # `ptmq export MODEL --bits 3 --w-bits 2`
    assert res['onnx'].endswith('model_w2a3.onnx')
    with pytest.raises(ValueError, match=r'weight bit-width 8 is not calibrated in this model; available: \[2, 3, 4\]'):
        export_command(out / 'model.safetensors', 3, w_bits=8)
    assert 'pair groups W2A2 | W3A3 | W4A4' in (out / 'report.html').read_text()

def test_params_with_pairs_refuse_what_is_not_supported_yet():
    from conftest import REPO
    from ptmq.experiment import load_params, ParamsError
    with pytest.raises(ParamsError, match=r"key 'benchmark': a benchmark of a weight-set calibration is not supported yet.*benchmark.settings\[0\].pairs"):
        load_params(REPO / 'params' / 'default.yaml', ['ptmq.pairs=[W2A2, W3A3, W4A4]', 'benchmark={seeds: [0]}'], check_paths=False)

def test_vit_with_a_weight_set_switches_and_round_trips(tmp_path):
    "A ViT's linear layers get the weight set; its patch embedding and head keep 8 bits; save/load bit-exact at every pair."
    from timm.models.vision_transformer import VisionTransformer
    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=2, mlp_ratio=2.0, num_classes=10).eval()
    qm = round_to_nearest(vit, torch.randn(16, 3, 32, 32), PTMQConfig(pairs=['W4A4', 'W4A8', 'W8A8'], observer='minmax', observe_images=8))
    sets = {q.bit_set for q in weight_quantizers(qm)}
    assert sets == {(4, 8), (8,)} and qm.w_set == (4, 8)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ref = {(w, a): set_bits(qm, a, w=w)(x) for w in (4, 8) for a in (4, 8)}
        assert not torch.equal(ref[(4, 8)], ref[(8, 8)])
        save(qm, tmp_path / 'vit.safetensors')
        back = load(tmp_path / 'vit.safetensors')
        for (w, a), y in ref.items(): assert torch.equal(set_bits(back, a, w=w)(x), y), (w, a)
