"PTMQ with one pass per step (`step_passes='one'`): the loss of a step by hand, the passes drawn as configured, determinism, errors."
import math
import pytest, torch
from ptmq.models import CifarResNet
from ptmq.arch import quantize_model
from ptmq.blocks import set_bits, weight_quantizers
from ptmq.loss import gd_loss, lp_distance
from ptmq.mfm import MultiBitFeatureMixer
from ptmq.recon import PTMQConfig, ptmq, STEP_PASSES
import ptmq.recon as R

GROUPS = {'low': [4], 'mid': [6], 'high': [8]}


@pytest.fixture(scope='module')
def unit_and_data():
    torch.manual_seed(0)
    qm = quantize_model(CifarResNet(8).eval(), 4, (4, 6, 8), head_q='last')
    unit = list(qm.units)[1]
    for q in weight_quantizers(unit): q.set_mode('soft')
    g = torch.Generator().manual_seed(1)
    x_fp = torch.relu(torch.randn(4, 16, 32, 32, generator=g))
    xs = {b: torch.relu(x_fp + 0.1 * torch.randn(x_fp.shape, generator=g)) for b in (4, 6, 8)}
    y = torch.randn(unit(x_fp).shape, generator=g)
    return unit, x_fp, xs, y


def _step(unit, x_fp, xs, y, cfg, seed=0):
    gen = torch.Generator().manual_seed(seed)
    mfm = MultiBitFeatureMixer(cfg.mix_lambdas, cfg.drop_prob, cfg.mfm)
    return R._one_pass_loss(unit, x_fp, lambda b: xs[b], y, cfg, mfm, gen, gen)


def test_one_pass_step_by_hand_and_in_expectation_gd_loss(unit_and_data):
    """With the draw forced to pass p (its lambda 1), the step's loss is `g0 D(f_p, f_fp)` plus, below the high pass, its
    distillation `g D(f_p, f_h)`; weighted by lambdas, the three are GD-Loss with the float term per pass and each
    distillation term weighted by its pass's lambda."""
    unit, x_fp, xs, y = unit_and_data
    g, lambdas = (1.0, 2.0, 0.5), (0.5, 0.3, 0.2)
    with torch.no_grad(): f = [set_bits(unit, b)(xs[b]) for b in (4, 6, 8)]
    losses = []
    for p in range(3):
        cfg = PTMQConfig(w_bits=4, groups=GROUPS, drop_prob=0.0, mix_lambdas=tuple(float(i == p) for i in range(3)), gd_weights=g, step_passes='one')
        loss, terms, bits = _step(unit, x_fp, xs, y, cfg)
        assert bits == (4, 6, 8)
        expect = g[0] * lp_distance(f[p], y) + (g[2 - p] * lp_distance(f[p], f[2]) if p < 2 else 0.0)
        assert loss.item() == pytest.approx(float(expect), rel=1e-5)
        assert terms['fp'].item() == pytest.approx(lp_distance(f[p], y).item(), rel=1e-5)
        assert math.isnan(terms['h_m'].item()) == (p != 1) and math.isnan(terms['h_l'].item()) == (p != 0)
        losses.append(loss.item())
    mean, _ = gd_loss(*f, y, lambdas=lambdas, g=(g[0], lambdas[1] * g[1], lambdas[0] * g[2]), fp_term='each')
    assert sum(l * v for l, v in zip(lambdas, losses)) == pytest.approx(mean.item(), rel=1e-5)


def test_one_pass_step_teacher_gets_no_gradient_when_detached(unit_and_data, monkeypatch):
    "The low pass's distillation reaches the weights only through the low pass: with a detached teacher the high pass runs without gradient."
    unit, x_fp, xs, y = unit_and_data
    grad_modes = []
    orig = R._set_pass
    monkeypatch.setattr(R, '_set_pass', lambda u, k: (grad_modes.append((k, torch.is_grad_enabled())), orig(u, k))[1])
    cfg = PTMQConfig(w_bits=4, groups=GROUPS, drop_prob=0.0, mix_lambdas=(1.0, 0.0, 0.0), step_passes='one')
    _step(unit, x_fp, xs, y, cfg)
    assert grad_modes == [(8, False), (4, True)]
    grad_modes.clear()
    _step(unit, x_fp, xs, y, PTMQConfig(w_bits=4, groups=GROUPS, drop_prob=0.0, mix_lambdas=(1.0, 0.0, 0.0), step_passes='one', detach_teacher=False))
    assert grad_modes == [(8, True), (4, True)]


def test_one_pass_draws_follow_the_lambdas(unit_and_data):
    "Which pass a step trains is drawn with probabilities `mix_lambdas`: the counts over many steps within sampling error."
    unit, x_fp, xs, y = unit_and_data
    lambdas, n = (0.5, 0.3, 0.2), 600
    cfg = PTMQConfig(w_bits=4, groups=GROUPS, drop_prob=0.0, mix_lambdas=lambdas, step_passes='one')
    gen = torch.Generator().manual_seed(0)
    mfm = MultiBitFeatureMixer(cfg.mix_lambdas, cfg.drop_prob, cfg.mfm)
    counts = [0, 0, 0]
    small = {b: v[:1] for b, v in xs.items()}
    for _ in range(n):
        with torch.no_grad(): _, terms, _ = R._one_pass_loss(unit, x_fp[:1], lambda b: small[b], y[:1], cfg, mfm, gen, gen)
        counts[0 if not math.isnan(terms['h_l'].item()) else 1 if not math.isnan(terms['h_m'].item()) else 2] += 1
    for c, l in zip(counts, lambdas):
        assert abs(c / n - l) < 4 * math.sqrt(l * (1 - l) / n), counts


def test_one_pass_calibration_runs_and_is_deterministic():
    torch.manual_seed(0)
    fp = CifarResNet(8).eval()
    calib = torch.randn(16, 3, 32, 32)
    cfg = PTMQConfig(w_bits=4, groups=GROUPS, iters=6, batch_size=4, observe_images=8, step_passes='one')
    a, b = ptmq(fp, calib, cfg, progress=False), ptmq(fp, calib, cfg, progress=False)
    for bits in (4, 6, 8):
        with torch.no_grad(): assert torch.equal(set_bits(a, bits)(calib[:4]), set_bits(b, bits)(calib[:4]))
    hist = a.calibration.history
    assert all(math.isfinite(h['gd_fp']) for h in hist)
    assert any(math.isnan(h['gd_h_m']) for h in hist)              # steps that did not train the mid pass log no distillation to it
    assert ptmq(fp, calib, PTMQConfig(w_bits=4, groups=GROUPS, iters=6, batch_size=4, observe_images=8), progress=False).config.step_passes == 'all'


def test_step_passes_is_validated():
    assert STEP_PASSES == ('all', 'one') and PTMQConfig().step_passes == 'all'
    with pytest.raises(ValueError, match=r"step_passes must be one of \('all', 'one'\), got 'two'"): PTMQConfig(step_passes='two')
    assert PTMQConfig.from_dict({'step_passes': 'one'}).to_dict()['step_passes'] == 'one'


def test_integer_lambdas_from_yaml_draw_like_floats(unit_and_data):
    "`mix_lambdas: [0, 0, 1]` in a parameter file arrives as ints: the config holds floats, and the one-pass draw takes the high pass every step."
    unit, x_fp, xs, y = unit_and_data
    cfg = PTMQConfig(w_bits=4, groups=GROUPS, drop_prob=0.0, mix_lambdas=[0, 0, 1], step_passes='one')
    assert cfg.mix_lambdas == (0.0, 0.0, 1.0) and all(type(l) is float for l in cfg.mix_lambdas)
    for seed in range(5):
        loss, terms, _ = _step(unit, x_fp, xs, y, cfg, seed)
        assert math.isnan(terms['h_m'].item()) and math.isnan(terms['h_l'].item())      # the high pass: the float term alone
