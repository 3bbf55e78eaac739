import pytest
import torch
from ptmq.mfm import BitGroups, MultiBitFeatureMixer
from ptmq.loss import lp_distance, gd_loss, rounding_reg, beta_schedule
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

def test_rounding_regulariser_and_beta_schedule():
    h = torch.tensor([0.0, 0.5, 1.0, 0.9])
    assert torch.isclose(rounding_reg([h], 2.0), torch.tensor(1 + (1 - 0.8 ** 2)))
    assert beta_schedule(19, 100) is None and beta_schedule(20, 100) == 20.0
    assert beta_schedule(60, 100) == pytest.approx(11.0) and beta_schedule(100, 100) == pytest.approx(2.0)
