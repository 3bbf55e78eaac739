"""Gains beside the shifts per bit-width (`PTMQConfig.bit_gain`) and the two-stage calibration (`stage2_share`): zero gains
are the shift-only model bit for bit, a gain row scales its channel and follows the bit-width, freeze/save/load/export keep
it exactly (format 4; the ONNX export is tested in tests/test_bit_bias.py), the second stage leaves the rounding and the
highest bit-width's rows as the first stage left them and trains only the rest, with `stage1='qdrop'` the highest bit-width
is the per-bit QDrop model bit for bit, with `stage1='paper'` every rounding and the highest bit-width are the paper's step's
bit for bit (the second stage runs after every unit's first), and bad settings get clear errors."""
import dataclasses, math
import pytest
import torch
from ptmq.arch import quantize_model, check_rebuild
from ptmq.blocks import BitBias, QuantLayer, set_bits, freeze_bits, weight_quantizers, act_quantizers, quant_state
from ptmq.models import CifarResNet
from ptmq.recon import PTMQConfig, ptmq, calibrate, round_to_nearest, _train
from ptmq.serialize import save, load, read_metadata
from ptmq.export import export_module

BITS = (3, 4, 8)
GROUPS = {'low': [3], 'mid': [4], 'high': [8]}

def _biases(m): return [b for b in m.modules() if isinstance(b, BitBias)]

def _cfg(**kw): return PTMQConfig(w_bits=4, groups=GROUPS, observe_images=8, observer='minmax', a_observer='minmax', **kw)

def _randomise(model, seed=0, gains=True):
    g = torch.Generator().manual_seed(seed)
    for b in _biases(model):
        for p in (b.params() if gains else [b.delta]): p.data = torch.randn(p.shape, generator=g) * 0.2

def _pair(seed=0):
    "The same float ResNet at round-to-nearest with shifts only and with shifts and gains; equal random shifts, the gains zero."
    torch.manual_seed(seed); fp, calib = CifarResNet(20).eval(), torch.randn(8, 3, 32, 32)
    shift, both = round_to_nearest(fp, calib, _cfg(bit_bias='lower')), round_to_nearest(fp, calib, _cfg(bit_bias='lower', bit_gain=True))
    _randomise(shift, seed); _randomise(both, seed, gains=False)
    return shift, both

class _Bar:
    def __init__(self): self.n = 0
    def update(self, k): self.n += k

def test_zero_gains_are_the_shift_only_model_bit_for_bit():
    shift, both = _pair()
    assert all(b.gain is not None and torch.count_nonzero(b.gain) == 0 for b in _biases(both))
    assert all(b.gain is None for b in _biases(shift))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for b in BITS: assert torch.equal(set_bits(shift, b)(x), set_bits(both, b)(x)), f"A{b}"

def test_a_gain_row_scales_its_channels_follows_the_bit_width_and_the_highest_row_is_zero():
    torch.manual_seed(0); fp, calib = CifarResNet(20).eval(), torch.randn(8, 3, 32, 32)
    plain, qm = round_to_nearest(fp, calib, _cfg()), round_to_nearest(fp, calib, _cfg(bit_bias='lower', bit_gain=True))
    _randomise(qm, 1)
    layer, h, x = qm.units[1].body[0], torch.randn(2, 16, 8, 8), torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for b in BITS:
            set_bits(qm, b)
            i, on = BITS.index(b), float(b != 8)
            g, d = (layer.bit_bias.gain[i] * on).view(1, -1, 1, 1), (layer.bit_bias.delta[i] * on).view(1, -1, 1, 1)
            assert torch.equal(layer.bit_bias(h), h * (1 + g) + d)
        assert torch.equal(set_bits(qm, 8)(x), set_bits(plain, 8)(x))          # random gains and shifts, none at the highest bit-width
        assert not torch.equal(set_bits(qm, 3)(x), set_bits(plain, 3)(x))
        unit, xs = qm.units[2], [torch.randn(2, 16, 32, 32) for _ in BITS]
        one = [set_bits(unit, b)(xi) for b, xi in zip(BITS, xs)]
        batched = set_bits(unit, BITS)(torch.cat(xs)).chunk(3)                  # a batched pass: each group of the batch its own row
        assert all(torch.allclose(a, c, atol=1e-6) for a, c in zip(one, batched))
        with quant_state(qm, weights=False, acts=False), quant_state(plain, weights=False, acts=False):
            assert torch.equal(qm(x), plain(x))                                     # the float model: no gain, no shift

def test_freeze_save_load_and_export_keep_the_gains_exactly(tmp_path):
    _, qm = _pair()
    _randomise(qm, 2)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = {b: set_bits(qm, b)(x) for b in BITS}
        for b in BITS:
            assert torch.equal(freeze_bits(qm, b)(x), ref[b]) and torch.equal(export_module(qm, b)(x), ref[b])
    check_rebuild(qm)
    save(qm, tmp_path / 'g.safetensors')
    meta = read_metadata(tmp_path / 'g.safetensors')
    assert meta['format_version'] == 4 and meta['spec']['bit_gain'] is True
    back = load(tmp_path / 'g.safetensors')
    assert all(b.gain is not None for b in _biases(back))
    with torch.no_grad():
        for b in BITS: assert torch.equal(set_bits(back, b)(x), ref[b]), f"A{b} differs after load"
    shift, _ = _pair()
    save(shift, tmp_path / 's.safetensors')
    assert read_metadata(tmp_path / 's.safetensors')['format_version'] == 3 and 'bit_gain' not in read_metadata(tmp_path / 's.safetensors')['spec']

def test_stages_split_the_iterations():
    c = _cfg(step_passes='one', iters=201, bit_bias='lower', stage2_share=0.5)
    first, second = c.stages()
    assert (first.iters, second.iters) == (101, 100) and first.mix_lambdas == c.mix_lambdas and second.mix_lambdas == (0.5, 0.5, 0.0)
    assert first.stage2_share == second.stage2_share == 0.0
    assert _cfg(step_passes='one', iters=1, stage2_share=0.9).stages()[1] is None       # no whole step for a second stage: one stage
    assert _cfg().stages() == (_cfg(), None)
    assert _cfg(step_passes='one', iters=100, stage2_share=0.29).stages()[1].iters == 29          # 0.29 x 100 in floats is 28.999...

def test_the_second_stage_keeps_the_rounding_and_the_highest_rows_and_trains_the_rest():
    torch.manual_seed(0)
    fp, calib = CifarResNet(8).eval(), torch.randn(16, 3, 32, 32)
    cfg = _cfg(step_passes='one', iters=8, batch_size=4, mix_lambdas=(0, 0, 1), bit_bias='lower', bit_gain=True, lr_bias=1e-2, stage2_share=0.5, seed=3)
    qm = round_to_nearest(fp, calib, dataclasses.replace(cfg, iters=0))
    unit = qm.units[1]
    with quant_state(qm, weights=False, acts=False), torch.no_grad(): x = qm.units[0](calib); y_fp = unit(x)
    first, second = cfg.stages()
    gen = torch.Generator().manual_seed(0)
    _train(unit, 1, x, {b: x for b in BITS}, y_fp, first, gen, gen, _Bar(), torch.device('cpu'))
    for q in weight_quantizers(unit): q.set_mode('hard')
    assert all(torch.count_nonzero(b.delta) == 0 and torch.count_nonzero(b.gain) == 0 for b in _biases(unit))   # the high pass alone: nothing to move
    layers = [l for l in unit.modules() if isinstance(l, QuantLayer)]
    codes = [l.wq.codes(l.layer.weight).clone() for l in layers]
    alphas = [q.alpha.clone() for q in weight_quantizers(unit)]
    switchable = [q for q in act_quantizers(unit) if q.switchable]
    steps = [q.scale.detach().clone() for q in switchable]
    bar = _Bar()
    rows = _train(unit, 1, x, {b: x for b in BITS}, y_fp, second, gen, gen, bar, torch.device('cpu'), rounding=False)
    assert bar.n == second.iters and all(math.isnan(r['gd_h_l']) != math.isnan(r['gd_h_m']) for r in rows)   # every step a low or a mid pass
    assert all(q.mode == 'hard' and not q.alpha.requires_grad for q in weight_quantizers(unit))
    assert all(torch.equal(a, q.alpha) for a, q in zip(alphas, weight_quantizers(unit)))
    assert all(torch.equal(c, l.wq.codes(l.layer.weight)) for c, l in zip(codes, layers))
    hi = BITS.index(8)
    assert all(torch.equal(s[hi], q.scale[hi]) for s, q in zip(steps, switchable))               # the highest bit-width's steps as stage 1 left them
    assert any(not torch.equal(s[:hi], q.scale[:hi]) for s, q in zip(steps, switchable))          # the lower ones trained
    for b in _biases(unit):
        assert torch.count_nonzero(b.gain[hi] * b.mask[hi]) == 0 and not b.gain.requires_grad
    assert any(torch.count_nonzero(b.gain[:hi]) > 0 and torch.count_nonzero(b.delta[:hi]) > 0 for b in _biases(unit))

def test_a_two_stage_calibration_is_deterministic_and_draws_each_stage_as_configured():
    torch.manual_seed(0)
    fp, calib = CifarResNet(8).eval(), torch.randn(16, 3, 32, 32)
    cfg = _cfg(step_passes='one', iters=6, batch_size=4, mix_lambdas=(0, 0, 1), bit_bias='lower', bit_gain=True, lr_bias=1e-2, stage2_share=0.5, seed=1)
    a, b = ptmq(fp, calib, cfg, progress=False), ptmq(fp, calib, cfg, progress=False)
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    h = a.calibration.history
    first = [r for r in h if r['iter'] < 3]
    second = [r for r in h if r['iter'] >= 3]
    assert first and second and max(r['iter'] for r in h) == 5
    assert all(math.isnan(r['gd_h_l']) and math.isnan(r['gd_h_m']) for r in first)               # stage 1: the high pass alone
    assert all(math.isnan(r['gd_h_l']) != math.isnan(r['gd_h_m']) for r in second)               # stage 2: low or mid
    assert {r['unit'] for r in second} == set(range(len(a.units) - 1))                              # the classifier (fixed 8-bit, no step): nothing left for stage 2
    assert a.config.to_dict()['stage2_share'] == 0.5 and a.spec.to_dict()['bit_gain'] is True

def test_stage1_qdrop_keeps_the_qdrop_model_at_the_highest_bit_width_bit_for_bit():
    "stage1='qdrop': the first stage is per-bit QDrop's own run at A8 and the second trains the lower bit-widths on a stream of its own."
    torch.manual_seed(0)
    fp, calib, x = CifarResNet(8).eval(), torch.randn(16, 3, 32, 32), torch.randn(4, 3, 32, 32)
    cfg = _cfg(step_passes='one', iters=8, batch_size=4, bit_bias='lower', bit_gain=True, lr_bias=1e-2, stage2_lr_act=1e-3, stage2_share=0.25,
               stage1='qdrop', seed=2)
    qm = ptmq(fp, calib, cfg, progress=False)
    qd = ptmq(fp, calib, _cfg(single_bits=8, iters=6, batch_size=4, seed=2), progress=False)      # the qdrop baseline: drop 0.5, inside the unit too
    assert qd.a_bits == (8,) and qd.config.drop_in_block == 0.5
    with torch.no_grad():
        assert torch.equal(set_bits(qm, 8)(x), qd(x))
    assert all(torch.count_nonzero(b.gain[:2]) > 0 for b in _biases(qm))            # the lower rows trained
    head = [q for q in act_quantizers(qm) if not q.switchable]                      # the fixed 8-bit quantizer every bit-width shares: QDrop's step
    assert head and all(torch.equal(q.scale, r.scale) for q, r in zip(head, [q for q in act_quantizers(qd) if not q.switchable]))
    h = qm.calibration.history
    assert all(math.isnan(r['gd_h_l']) != math.isnan(r['gd_h_m']) for r in h if r['iter'] >= 6)   # stage 2: low or mid
    first, second = cfg.stages()
    assert (first.single_bits, first.block_drop, first.iters, first.lr_act, second.lr_act, second.iters) == (8, True, 6, cfg.lr_act, 1e-3, 2)
    alone, none = dataclasses.replace(cfg, iters=3).stages()                         # no whole step left for stage 2: still QDrop's run
    assert none is None and (alone.single_bits, alone.iters, alone.stage1) == (8, 3, 'ptmq')

def test_lr_bias_schedule_cosine_anneals_the_shift_rates_over_each_stage(monkeypatch):
    "lr_bias_schedule='cosine': the shifts' and gains' Adam rate follows a cosine from lr_bias to 0 over each stage, stepped every iteration; 'constant' makes no such schedule."
    made = []
    class Cos(torch.optim.lr_scheduler.CosineAnnealingLR):
        def __init__(self, opt, *a, **k): super().__init__(opt, *a, **k); made.append(self)
    monkeypatch.setattr(torch.optim.lr_scheduler, 'CosineAnnealingLR', Cos)
    torch.manual_seed(0)
    fp, calib, x = CifarResNet(8).eval(), torch.randn(16, 3, 32, 32), torch.randn(4, 3, 32, 32)
    kw = dict(step_passes='one', iters=8, batch_size=4, bit_bias='lower', bit_gain=True, lr_bias=1e-2, stage2_lr_act=1e-3, stage2_share=0.25, stage1='qdrop', seed=2)
    runs = {}
    for sched in ('constant', 'cosine'):
        made.clear()
        runs[sched] = ptmq(fp, calib, _cfg(lr_bias_schedule=sched, **kw), progress=False)
        shift = [s for s in made if any(p is b.delta for b in _biases(runs[sched]) for g in s.optimizer.param_groups for p in g['params'])]
        if sched == 'constant': assert not shift
        else:
            assert shift and all(s.base_lrs == [1e-2] and s.T_max in (6, 2) and s.last_epoch == s.T_max for s in shift)   # from lr_bias, stepped to the stage's end
            assert all(s.optimizer.param_groups[0]['lr'] == 0.0 for s in shift)
    a, b = runs['constant'], runs['cosine']
    with torch.no_grad():
        assert torch.equal(set_bits(a, 8)(x), set_bits(b, 8)(x))                      # the highest bit-width: QDrop's either way
        assert not torch.equal(set_bits(a, 3)(x), set_bits(b, 3)(x))                  # the lower ones: other shift rates, other shifts
    with pytest.raises(ValueError, match="lr_bias_schedule must be one of"): PTMQConfig(lr_bias_schedule='linear')

def test_two_stage_and_gain_errors():
    with pytest.raises(ValueError, match="bit_gain adds a gain beside each shift: it needs bit_bias"): PTMQConfig(bit_gain=True)
    with pytest.raises(ValueError, match="bit_gain adds a gain"): quantize_model(CifarResNet(8), 4, BITS, bit_gain=True)
    with pytest.raises(ValueError, match="bit_gain must be true or false"): PTMQConfig(bit_bias='lower', bit_gain='yes')
    for bad in (1.0, -0.1, 'half'):
        with pytest.raises(ValueError, match=r"stage2_share must be a number in \[0, 1\)"): PTMQConfig(step_passes='one', stage2_share=bad)
    for kw in ({}, {'step_passes': 'one', 'single_bits': 4}, {'step_passes': 'one', 'pairs': ['W4A4', 'W4A6', 'W4A8']}):
        with pytest.raises(ValueError, match="stage2_share .* is for a multi-bit calibration over groups with step_passes='one'"):
            PTMQConfig(stage2_share=0.5, **kw)
    with pytest.raises(ValueError, match="stage2_lambdas must be 3 numbers"): PTMQConfig(stage2_lambdas='low')
    with pytest.raises(ValueError): PTMQConfig(stage2_lambdas=(-1, 1, 1))
    qm = quantize_model(CifarResNet(8), 4, BITS, bit_bias='lower')
    with pytest.raises(ValueError, match="asks bit_gain=True, the model was built with False"):
        calibrate(qm, torch.randn(4, 3, 32, 32), _cfg(iters=0, bit_bias='lower', bit_gain=True))
    assert PTMQConfig(single_bits=4, bit_bias='lower', bit_gain=True).gains is False          # a single-bit run builds no shift, so no gain
    with pytest.raises(ValueError, match="unknown PTMQ config key"): PTMQConfig.from_dict({'stage2': 0.5})
    with pytest.raises(ValueError, match=r"stage1 must be one of \('ptmq', 'qdrop', 'paper'\)"): PTMQConfig(stage1='QDrop')
    with pytest.raises(ValueError, match="stage2_lr_act must be None or > 0"): PTMQConfig(stage2_lr_act=0)
    ok = dict(step_passes='one', stage2_share=0.2, bit_bias='lower', stage1='qdrop')
    PTMQConfig(**ok)
    for kw in ({'stage2_share': 0.0}, {'bit_bias': 'all'}, {'stage2_lambdas': (0.4, 0.4, 0.2)}):
        with pytest.raises(ValueError, match="stage1='qdrop' runs per-bit QDrop at the highest bit-width and leaves it as QDrop made it"):
            PTMQConfig(**{**ok, **kw})

def _paper_setup(**kw):
    "A tiny ResNet, calibration and test images, and a stage1='paper' config with shifts and gains (8 steps: 6 + 2)."
    torch.manual_seed(0)
    fp, calib, x = CifarResNet(8).eval(), torch.randn(16, 3, 32, 32), torch.randn(4, 3, 32, 32)
    return fp, calib, x, _cfg(iters=8, batch_size=4, bit_bias='lower', bit_gain=True, lr_bias=1e-2, stage2_lr_act=1e-3, stage2_share=0.25,
                              stage1='paper', seed=2, **kw)

def _codes(m): return [l.wq.codes(l.layer.weight) for l in m.modules() if isinstance(l, QuantLayer)]

def test_stage1_paper_keeps_the_papers_step_bit_for_bit_and_trains_the_lower_bit_widths_after_it():
    "stage1='paper': every unit's first stage is the paper's three-pass step with the shifts at rest; the second stage runs once every unit's first is done (the paper's step sees the lower passes as it made them), on a stream of its own, lower bit-widths only."
    fp, calib, x, cfg = _paper_setup()
    first, second = cfg.stages()
    assert (first.step_passes, first.iters, first.stage1, second.step_passes, second.iters, second.lr_act) == ('all', 6, 'ptmq', 'one', 2, 1e-3)
    qm = ptmq(fp, calib, cfg, progress=False)
    paper = ptmq(fp, calib, _cfg(iters=6, batch_size=4, seed=2), progress=False)     # the paper's step alone, no shifts built
    assert all(torch.equal(a, b) for a, b in zip(_codes(qm), _codes(paper)))        # every rounding
    with torch.no_grad():
        assert torch.equal(set_bits(qm, 8)(x), set_bits(paper, 8)(x))
        assert not torch.equal(set_bits(qm, 3)(x), set_bits(paper, 3)(x))          # the lower bit-widths: their steps, shifts and gains trained
    assert all(torch.count_nonzero(b.gain[:2]) > 0 and torch.count_nonzero(b.gain[2] * b.mask[2]) == 0 for b in _biases(qm))
    head = [q for q in act_quantizers(qm) if not q.switchable]                      # the fixed 8-bit quantizer every bit-width shares: the paper's step's
    assert head and all(torch.equal(q.scale, r.scale) for q, r in zip(head, [q for q in act_quantizers(paper) if not q.switchable]))
    h = qm.calibration.history
    one, two = [r for r in h if r['iter'] < 6], [r for r in h if r['iter'] >= 6]
    assert h == one + two and one and two                                            # the stage-2 sweep after the whole stage-1 sweep
    assert all(not math.isnan(r['gd_h_l']) and not math.isnan(r['gd_h_m']) for r in one)          # three passes a step
    assert all(math.isnan(r['gd_h_l']) != math.isnan(r['gd_h_m']) for r in two)                    # one pass, low or mid
    assert len(qm.calibration.unit_seconds) == len(qm.units) == len(qm.calibration.loop_seconds)
    again = ptmq(fp, calib, cfg, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(qm.state_dict().values(), again.state_dict().values()))   # deterministic
    ok = dict(stage2_share=0.2, bit_bias='lower', stage1='paper')
    PTMQConfig(**ok)
    with pytest.raises(ValueError, match=r"with stage1='paper': 'all', the paper's step"): PTMQConfig(**ok, step_passes='one')
    for kw in ({'stage2_share': 0.0}, {'bit_bias': 'all'}, {'stage2_lambdas': (0.4, 0.4, 0.2)}):
        with pytest.raises(ValueError, match="stage1='paper' runs the paper's three-pass step with the shifts at rest"): PTMQConfig(**{**ok, **kw})

def test_stage1_shifts_trains_the_shifts_in_the_papers_step_and_keeps_its_rounding():
    "stage1_shifts: the first stage of stage1='paper' is the three-pass step with the shifts per lower bit-width training beside the rounding, bit for bit the one-stage run of the first stage's config (every rounding, A8); the second sweep then moves the lower bit-widths only."
    fp, calib, x, cfg = _paper_setup(stage1_shifts=True)
    first, second = cfg.stages()
    assert not first.stage1_shifts and not second.stage1_shifts and first.bit_bias == 'lower'
    qm, one = ptmq(fp, calib, cfg, progress=False), ptmq(fp, calib, first, progress=False)    # `one`: the first stage alone, shifts training
    rest = ptmq(fp, calib, dataclasses.replace(cfg, stage1_shifts=False), progress=False)     # the shifts at rest in the paper's step
    assert all(torch.equal(a, b) for a, b in zip(_codes(qm), _codes(one)))            # every rounding: the first stage's
    assert not all(torch.equal(a, b) for a, b in zip(_codes(qm), _codes(rest)))       # ... which the training shifts changed
    assert any(torch.count_nonzero(b.delta) > 0 for b in _biases(one))               # the shifts trained in the first stage
    with torch.no_grad():
        assert torch.equal(set_bits(qm, 8)(x), set_bits(one, 8)(x))
        assert not torch.equal(set_bits(qm, 3)(x), set_bits(one, 3)(x))           # the second sweep: the lower bit-widths
    with pytest.raises(ValueError, match="stage1_shifts trains the shifts per lower bit-width"): PTMQConfig(stage1_shifts=True, bit_bias='lower')
    with pytest.raises(ValueError, match="got stage1='paper', bit_bias='none'"):
        PTMQConfig(stage1_shifts=True, stage1='paper', stage2_share=0.2)
    with pytest.raises(ValueError, match="stage1_shifts must be true or false"): PTMQConfig(stage1_shifts=1)
