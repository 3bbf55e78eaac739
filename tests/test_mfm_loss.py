import pytest
import torch
from ptmq.mfm import BitGroups, MultiBitFeatureMixer
from ptmq.loss import lp_distance, gd_loss, balanced_sum, rounding_reg, beta_schedule
from ptmq.recon import PTMQConfig

def test_bitgroups_validation_and_sampling():
    g = BitGroups((3, 4), (5, 6), (7, 8))
    assert g.all_bits == (3, 4, 5, 6, 7, 8)
    gen = torch.Generator().manual_seed(0)
    draws = {g.sample(gen) for _ in range(200)}
    assert all(l in (3, 4) and m in (5, 6) and h in (7, 8) for l, m, h in draws) and len(draws) == 8
    with pytest.raises(ValueError, match='low < mid < high'): BitGroups((4,), (4,), (8,))
    with pytest.raises(ValueError, match='2..8'): BitGroups((1,), (4,), (8,))
    with pytest.raises(ValueError, match='2..8'): BitGroups((4,), (6,), (9,))
    with pytest.raises(ValueError, match='empty'): BitGroups((), (6,), (8,))
    assert BitGroups.from_a_bits(6) == BitGroups((6,), (7,), (8,)) and BitGroups.from_a_bits(4) == BitGroups((4,), (5,), (8,))

def test_mfm_hand_computed_with_fixed_seed():
    mfm = MultiBitFeatureMixer((0.5, 0.25, 0.25), p=0.5)
    x_fp = torch.full((3, 4), 10.0)
    xs = [torch.full((3, 4), 1.0), torch.full((3, 4), 2.0), torch.full((3, 4), 6.0)]
    out = mfm(x_fp, xs, torch.Generator().manual_seed(7))
    mask = torch.rand((3, 4), generator=torch.Generator().manual_seed(7)) < 0.5     # the same draw, by hand
    expected = torch.where(mask, torch.tensor(10.0), torch.tensor(0.5 * 1 + 0.25 * 2 + 0.25 * 6))   # mix = 2.5
    assert all(torch.equal(o, expected) for o in out)
    assert 0 < mask.sum() < mask.numel()

def test_mfm_variants():
    x_fp = torch.zeros(2, 5); xs = [torch.full((2, 5), v) for v in (3.0, 6.0, 9.0)]
    assert all(torch.equal(o, torch.full((2, 5), 6.0)) for o in MultiBitFeatureMixer(mode='mix_no_fp')(x_fp, xs))
    out = MultiBitFeatureMixer(p=0.0, mode='none')(x_fp, xs)
    assert [o[0, 0].item() for o in out] == [3.0, 6.0, 9.0]
    assert torch.equal(MultiBitFeatureMixer(p=1.0)(x_fp, xs)[0], x_fp)
    with pytest.raises(ValueError, match='sum'): MultiBitFeatureMixer((0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match='mode'): MultiBitFeatureMixer(mode='avg')

def test_lp_distance_sums_channels_and_averages_the_rest():
    a, b = torch.zeros(2, 3, 4, 4), torch.ones(2, 3, 4, 4)
    assert lp_distance(a, b).item() == 3.0
    assert lp_distance(torch.zeros(4, 10), torch.full((4, 10), 2.0)).item() == 40.0

def test_gd_loss_hand_values_and_teacher_detach():
    f_fp = torch.zeros(2, 3)
    f_l = torch.full((2, 3), 3.0, requires_grad=True); f_m = torch.full((2, 3), 2.0, requires_grad=True)
    f_h = torch.full((2, 3), 1.0, requires_grad=True)
    total, terms = gd_loss(f_l, f_m, f_h, f_fp, g=(1.0, 2.0, 0.5))
    assert {k: v.item() for k, v in terms.items()} == {'fp': 12.0, 'h_m': 3.0, 'h_l': 12.0}
    assert total.item() == 12 + 2 * 3 + 0.5 * 12
    total.backward()
    # d/d f_h (per element): only through the mix, 2 * lambda_h * (mix - fp) / batch = 2 * (1/3) * 2 / 2
    assert torch.allclose(f_h.grad, torch.full((2, 3), 2 / 3))
    f_h.grad = None
    total, _ = gd_loss(f_l, f_m, f_h, f_fp, g=(1.0, 2.0, 0.5), detach_teacher=False); total.backward()
    # the distillation terms now pull the teacher too: + 2 * 2 * (f_h - f_m)/2 + 0.5 * 2 * (f_h - f_l)/2
    assert torch.allclose(f_h.grad, torch.full((2, 3), 2 / 3 + 2 * (1 - 2) + 0.5 * (1 - 3)))

def test_gd_loss_float_term_per_pass():
    "fp_term='each': lambda-weighted D(f_b, f_fp); the high pass's gradient no longer depends on the low pass's error."
    f_fp = torch.zeros(2, 3)
    f_l = torch.full((2, 3), 3.0, requires_grad=True); f_m = torch.full((2, 3), 2.0, requires_grad=True)
    f_h = torch.full((2, 3), 1.0, requires_grad=True)
    total, terms = gd_loss(f_l, f_m, f_h, f_fp, lambdas=(0.5, 0.25, 0.25), g=(1.0, 0.0, 0.0), fp_term='each')
    assert terms['fp'].item() == 0.5 * 27 + 0.25 * 12 + 0.25 * 3 and total.item() == terms['fp'].item()
    total.backward()
    assert torch.allclose(f_h.grad, torch.full((2, 3), 0.25 * 2 * 1.0 / 2))       # lambda_h * 2 (f_h - f_fp) / batch
    with pytest.raises(ValueError, match="fp_term must be one of"): gd_loss(f_l, f_m, f_h, f_fp, fp_term='sum')
    with pytest.raises(ValueError, match="gd_fp must be one of"): PTMQConfig(gd_fp='sum')

def test_gd_loss_balanced_per_pass():
    "balance=gamma: each pass's group G_p weighted by (mean / G_p)^gamma, detached; the gradient per pass scaled by that weight."
    f_fp = torch.zeros(2, 3)
    mk = lambda: [torch.full((2, 3), v, requires_grad=True) for v in (3.0, 2.0, 1.0)]
    (f_l, f_m, f_h), g = mk(), (1.0, 2.0, 0.5)
    plain, terms = gd_loss(f_l, f_m, f_h, f_fp, g=g, fp_term='each')
    G = [27 + 0.5 * 12, 12 + 2 * 3, 3]                      # g1 D(f_l) + g3 D(f_l, f_h), g1 D(f_m) + g2 D(f_m, f_h), g1 D(f_h)
    M = sum(G) / 3
    for gamma in (1.0, 0.5):
        (f_l, f_m, f_h) = fs = mk()
        total, t2 = gd_loss(f_l, f_m, f_h, f_fp, g=g, fp_term='each', balance=gamma)
        assert {k: v.item() for k, v in t2.items()} == {k: v.item() for k, v in terms.items()}   # the reported terms are unchanged
        assert total.item() == pytest.approx(sum(x * (M / x) ** gamma for x in G))
        total.backward()
        by_hand = [2 * 3 / 2 + 0.5 * 2 * (3 - 1) / 2, 2 * 2 / 2 + 2 * 2 * (2 - 1) / 2, 2 * 1 / 2]   # dG_p / df_p per element
        for f, gr, x in zip(fs, by_hand, G): assert torch.allclose(f.grad, torch.full((2, 3), gr * (M / x) ** gamma))
    # balanced_sum at gamma = 0 is the plain sum; a group at 0 gets no gradient and no nan
    xs = [torch.tensor(v, requires_grad=True) for v in (4.0, 0.0, 1.0)]
    assert balanced_sum(xs, 0.0).item() == 5.0
    s = balanced_sum(xs, 1.0); s.backward()
    assert torch.isfinite(s) and all(torch.isfinite(x.grad) for x in xs) and xs[0].grad.item() == pytest.approx(5 / 3 / 4)
    with pytest.raises(ValueError, match="fp_term='each'"): gd_loss(f_l, f_m, f_h, f_fp, balance=1.0)
    with pytest.raises(ValueError, match="balance must be >= 0"): gd_loss(f_l, f_m, f_h, f_fp, fp_term='each', balance=-1.0)
    with pytest.raises(ValueError, match="gd_fp 'each'"): PTMQConfig(gd_balance=1.0)
    with pytest.raises(ValueError, match="three-pass step"): PTMQConfig(gd_fp='each', gd_balance=1.0, step_passes='one')
    with pytest.raises(ValueError, match=r"gd_balance must be a number in \[0, 4\]"): PTMQConfig(gd_fp='each', gd_balance='yes')
    cfg = PTMQConfig(gd_fp='each', gd_balance=0.5, stage1='paper', stage2_share=0.2, stage2_lambdas=(0.5, 0.5, 0.0))
    first, second = cfg.stages()
    assert first.gd_balance == 0.5 and second.gd_balance == 0.0 and second.step_passes == 'one'   # the one-pass stage has nothing to balance

def test_drift_warning_names_long_unbalanced_three_pass_w3_calibrations():
    w3 = dict(w_bits=3, groups=BitGroups((3,), (4,), (8,)))
    msg = PTMQConfig(**w3, iters=500).drift_warning()
    assert msg.startswith('500 iterations per unit of the three-pass step with a 3-bit pass') and 'gd_balance: 0.5' in msg
    assert PTMQConfig(**w3, iters=499).drift_warning() is None                              # short
    assert PTMQConfig(**w3, iters=2000, gd_fp='each', gd_balance=0.5).drift_warning() is None   # balanced
    assert PTMQConfig(**w3, iters=2000, gd_fp='each').drift_warning() is not None           # the float term per pass alone drifts too
    assert PTMQConfig(iters=2000).drift_warning() is None                                   # W4, groups {4},{6},{8}
    assert PTMQConfig(**w3, iters=2000, single_bits=3).drift_warning() is None              # one bit-width, nothing to drift
    assert PTMQConfig(**w3, iters=2000, step_passes='one').drift_warning() is None
    # with a second stage, only the three-pass share counts: 600 x (1 - 0.2) = 480 < 500
    two = dict(stage1='paper', stage2_share=0.2, bit_bias='lower', bit_gain=True)
    assert PTMQConfig(**w3, iters=600, **two).drift_warning() is None and PTMQConfig(**w3, iters=700, **two).drift_warning().startswith('560 ')

def test_rounding_regulariser_and_beta_schedule():
    h = torch.tensor([0.0, 0.5, 1.0, 0.9])
    assert torch.isclose(rounding_reg([h], 2.0), torch.tensor(1 + (1 - 0.8 ** 2)))
    assert beta_schedule(19, 100) is None and beta_schedule(20, 100) == 20.0
    assert beta_schedule(60, 100) == pytest.approx(11.0) and beta_schedule(100, 100) == pytest.approx(2.0)
