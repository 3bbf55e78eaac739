import copy
import pytest
import torch
from torch import nn
import torchvision
from torchvision.models.resnet import ResNet, Bottleneck
from ptmq.models import create_model, CifarResNet
from ptmq.blocks import quant_state, set_bits, freeze_bits, act_quantizers, kept_bits, plan_slots, QuantResidualBlock
from ptmq.arch import quantize_model
from ptmq.recon import PTMQConfig, ptmq, round_to_nearest

def _randomize_bn(model):
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model.eval()

MODELS = {
    'cifar_resnet20': (lambda: CifarResNet(20), 32),
    'resnet18': (lambda: torchvision.models.resnet18(num_classes=10), 64),
    'bottleneck_resnet': (lambda: ResNet(Bottleneck, [1, 1, 1, 1], num_classes=10), 64),
    'mobilenet_v2': (lambda: torchvision.models.mobilenet_v2(num_classes=10), 64),
    'regnetx_006': (lambda: create_model('regnetx_006', pretrained=False), 64),
}

@pytest.mark.parametrize('name', list(MODELS))
def test_wrapping_is_exact_without_quantization_and_close_at_8_bits(name):
    build, size = MODELS[name]
    fp = _randomize_bn(build())
    x = torch.randn(4, 3, size, size)
    qm = quantize_model(fp, w_bits=8, a_bits=(4, 8), observer='minmax')  # minmax: the wrapping is under test, not the observer
    with torch.no_grad():
        ref = fp(x)
        with quant_state(qm, weights=False, acts=False): assert torch.allclose(qm(x), ref, atol=1e-4, rtol=1e-4)
    rtn = round_to_nearest(fp, torch.randn(16, 3, size, size), PTMQConfig(w_bits=8, observe_images=16, observer='minmax', groups={'low': [4], 'mid': [6], 'high': [8]}))
    with torch.no_grad():
        out = set_bits(rtn, 8)(x)
    cos = nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0)
    assert cos > 0.98, f"W8A8 output far from float (cosine {cos:.3f})"
    assert sum(isinstance(u, QuantResidualBlock) for u in rtn.units) >= 4

def test_first_last_layers_and_the_last_activation_stay_at_8_bits():
    qm = quantize_model(CifarResNet(20), w_bits=3, a_bits=(3, 4, 8))            # head_q='last': QDrop's setting
    stem, head = qm.units[0][0], qm.units[-1]
    assert stem.wq.bits == 8 and head.fc.wq.bits == 8 and qm.units[1].body[0].wq.bits == 3
    assert qm.units[-2].out_q.bits == (8,) and not qm.units[-2].out_q.switchable and head.fc.in_q is None
    set_bits(qm, 3)
    assert qm.units[-2].out_q.current_bits == 8 and qm.units[-2].body[0].out_q.current_bits == 3 and qm.units[1].out_q.current_bits == 3
    strict = quantize_model(CifarResNet(20), w_bits=3, a_bits=(3, 4, 8), head_q='pooled')
    set_bits(strict, 3)
    assert strict.units[-1].fc.in_q.bits == (8,) and not strict.units[-1].fc.in_q.switchable
    assert strict.units[-1].fc.in_q.current_bits == 8 and strict.units[-2].out_q.current_bits == 3

@pytest.fixture(scope='module')
def calibrated():
    torch.manual_seed(0)
    fp = _randomize_bn(CifarResNet(20))
    cfg = PTMQConfig(iters=3, batch_size=4, observe_images=16, groups={'low': [3, 4], 'mid': [6], 'high': [8]})
    return ptmq(fp, torch.randn(32, 3, 32, 32), cfg, progress=False)

def test_switching_changes_only_an_index_and_is_bit_exact(calibrated):
    qm, x = calibrated, torch.randn(3, 3, 32, 32)
    state = {k: v.clone() for k, v in qm.state_dict().items()}
    with torch.no_grad():
        outs = {b: set_bits(qm, b)(x) for b in qm.a_bits}
        again = {b: set_bits(qm, b)(x) for b in reversed(qm.a_bits)}
    assert all(torch.equal(outs[b], again[b]) for b in qm.a_bits)
    assert not torch.equal(outs[3], outs[8])
    after = qm.state_dict()
    assert all(torch.equal(state[k], after[k]) for k in state), "switching must not change any parameter or buffer"
    assert all(q.current_bits == 3 for q in act_quantizers(qm) if q.switchable)

def test_switched_model_equals_quantizers_evaluated_directly_at_b(calibrated):
    qm, x = calibrated, torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        for b in qm.a_bits:
            assert torch.equal(set_bits(qm, b)(x), freeze_bits(qm, b)(x))
            q = qm.units[2].out_q; i = q.index(b)
            t = torch.randn(100) * 3
            from ptmq.quant import fake_quant
            assert torch.equal(q(t), fake_quant(t, q.scale[i], q.zero_point[i], 0, 2 ** b - 1))

def test_kept_bits_restores_every_bit_width_even_after_an_error(calibrated):
    qm = calibrated
    plan = [(3, 4, 6, 8)[i % 4] for i in range(len(plan_slots(qm)))]
    set_bits(qm, plan)
    before = [q.idx for q in act_quantizers(qm)]
    with kept_bits(qm): set_bits(qm, 8)
    assert [q.idx for q in act_quantizers(qm)] == before
    with pytest.raises(RuntimeError, match='boom'):
        with kept_bits(qm):
            set_bits(qm, 3); raise RuntimeError('boom')
    assert [q.idx for q in act_quantizers(qm)] == before and [s.q.current_bits for s in plan_slots(qm)] == plan

def test_set_bits_rejects_uncalibrated_bit_width(calibrated):
    with pytest.raises(ValueError, match='bit-width 5 is not calibrated'): set_bits(calibrated, 5)

def test_calibration_is_deterministic():
    fp = _randomize_bn(CifarResNet(20))
    calib = torch.randn(16, 3, 32, 32)
    cfg = PTMQConfig(iters=2, batch_size=4, observe_images=8, seed=3)
    a, b = ptmq(fp, calib, cfg, progress=False), ptmq(fp, calib, cfg, progress=False)
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a.calibration.history == b.calibration.history

def test_unsupported_model_and_missing_bits():
    with pytest.raises(TypeError, match='no quantized wrapping'): quantize_model(nn.Sequential(nn.Conv2d(3, 3, 1)), 4, (4,))
    qm = quantize_model(CifarResNet(20), 4, (4, 8))
    from ptmq.recon import calibrate
    with pytest.raises(ValueError, match='no steps for bit-widths'): calibrate(qm, torch.randn(4, 3, 32, 32), PTMQConfig(iters=0))

@pytest.mark.parametrize('drop_prob', [0.5, 0.0])
def test_single_bit_baselines_use_the_same_loop(drop_prob):
    fp = _randomize_bn(CifarResNet(20))
    cfg = PTMQConfig(iters=3, batch_size=4, observe_images=8, single_bits=4, drop_prob=drop_prob)
    assert cfg.a_bits == (4,)
    qm = ptmq(fp, torch.randn(16, 3, 32, 32), cfg, progress=False)
    assert qm.a_bits == (4,) and all(q.bits in ((4,), (8,)) for q in act_quantizers(qm))
    h = qm.calibration.history
    assert {r['bits'] for r in h} == {'4'} and all(r['gd_h_m'] == 0.0 for r in h)
    with pytest.raises(ValueError, match='single_bits'): PTMQConfig(single_bits=9)

@pytest.mark.parametrize('name,unit', [('cifar_resnet20', 1), ('cifar_resnet20', 4), ('resnet18', 3), ('mobilenet_v2', 2)])
def test_forward_bits_equals_separate_passes_values_and_gradients(name, unit):
    "Sharing the bit-independent prefix (first layer, shortcut) across bit-widths changes neither outputs nor gradients."
    from ptmq.blocks import set_weight_mode, weight_quantizers
    qm = quantize_model(create_model(name, pretrained=False), 4, (4, 6, 8))
    blk = qm.units[unit]
    assert isinstance(blk, QuantResidualBlock)
    set_weight_mode(blk, 'soft')
    x = torch.randn(2, blk.body[0].layer.in_channels, 16, 16)
    params = [q.alpha for q in weight_quantizers(blk)] + [q.scale for q in act_quantizers(blk)]
    for p in params: p.requires_grad_(True)
    loss = lambda outs: sum((o ** 2).sum() * (i + 1) for i, o in enumerate(outs))
    shared = blk.forward_bits(x, (4, 6, 8))
    separate = [set_bits(blk, b)(x) for b in (4, 6, 8)]
    assert all(torch.equal(a, b) for a, b in zip(shared, separate))
    for ga, gb in zip(torch.autograd.grad(loss(shared), params), torch.autograd.grad(loss(separate), params)):
        torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-6)
