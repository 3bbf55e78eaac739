"""The shift per activation bit-width (`BitBias`, `PTMQConfig.bit_bias`): zero shifts are the plain model bit for bit, the row
follows the bit-width (int, batched tuple, plan, direct index), the highest row stays zero with 'lower', no shift in the float
model, freeze/save/load/export keep it exactly, and a calibration trains it deterministically."""
import pytest
import torch
from torch import nn
from timm.models.vision_transformer import VisionTransformer
from ptmq.arch import quantize_model, check_rebuild
from ptmq.blocks import BitBias, QuantLayer, set_bits, freeze_bits, quant_state, plan_slots, act_quantizers, set_weight_mode
from ptmq.models import CifarResNet
from ptmq.recon import PTMQConfig, ptmq, calibrate, round_to_nearest
from ptmq.serialize import save, load, read_metadata
from ptmq.export import export_module

BITS = (3, 4, 8)

def _vit():
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=2, mlp_ratio=2.0, num_classes=10)

def _shifts(m): return [b for b in m.modules() if isinstance(b, BitBias)]

def _cfg(bit_bias='none', **kw): return PTMQConfig(w_bits=4, groups={'low': [3], 'mid': [4], 'high': [8]}, observe_images=8, observer='minmax', a_observer='minmax', bit_bias=bit_bias, **kw)

def _pair(build, rows='lower', shifts=True, seed=0, gain=False):
    "The same float model at round-to-nearest without and with shifts (equal quantizers; `gain`: with gains too); the shifts (and gains) random if `shifts`."
    torch.manual_seed(seed); fp, calib = build().eval(), torch.randn(8, 3, 32, 32)
    plain, shifted = round_to_nearest(fp, calib, _cfg()), round_to_nearest(fp, calib, _cfg(bit_bias=rows, bit_gain=gain))
    if shifts:
        g = torch.Generator().manual_seed(seed)
        for b in _shifts(shifted):
            for p in b.params(): p.data = torch.randn(p.shape, generator=g) * 0.2
    return plain, shifted

@pytest.mark.parametrize('build', [lambda: CifarResNet(20), _vit], ids=['resnet20', 'vit'])
@pytest.mark.parametrize('rows', ['lower', 'all'])
def test_zero_shifts_are_the_plain_model_bit_for_bit(build, rows):
    plain, shifted = _pair(build, rows, shifts=False)
    assert _shifts(shifted) and not _shifts(plain)
    assert all(torch.count_nonzero(b.delta) == 0 for b in _shifts(shifted))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for b in BITS: assert torch.equal(set_bits(plain, b)(x), set_bits(shifted, b)(x)), f"A{b}"

def test_where_the_shifts_are():
    "Every layer with switchable weights has one (convs on the channel axis, linears on the last), linked to its unit's first switchable quantizer; the first and last layers have none."
    r = quantize_model(CifarResNet(20), 4, BITS, bit_bias='lower')
    layers = [m for m in r.modules() if isinstance(m, QuantLayer)]
    assert all((l.bit_bias is not None) == l.wq.switchable for l in layers)
    assert not _shifts(r.units[0]) and r.units[-1].fc.bit_bias is None       # the stem and the classifier: 8-bit weights, no shift
    for u in r.units[1:-1]:
        first = next(q for q in act_quantizers(u) if q.switchable)
        assert all(b.src is first and b.dim == 1 for b in _shifts(u))
    v = quantize_model(_vit(), 4, BITS, bit_bias='all')
    assert {b.dim for b in _shifts(v)} == {-1} and v.units[1].fc1.bit_bias.delta.shape == (3, v.units[1].fc1.layer.out_features)
    one = quantize_model(CifarResNet(20), 4, (4,), bit_bias='lower')
    assert not _shifts(one)                                     # one bit-width, highest row held at zero: nothing to shift
    assert 'bit_bias' not in quantize_model(CifarResNet(20), 4, BITS).spec.to_dict()

def test_the_row_follows_the_bit_width_and_the_highest_row_is_zero_with_lower():
    plain, shifted = _pair(lambda: CifarResNet(20), 'lower')
    layer = shifted.units[1].body[0]
    h = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        for b in BITS:
            set_bits(shifted, b)
            want = layer.bit_bias.delta[BITS.index(b)] * (b != 8)
            assert torch.equal(layer.bit_bias(h) - h, (h + want.view(1, -1, 1, 1)) - h)
        x = torch.randn(2, 3, 32, 32)
        assert torch.equal(set_bits(plain, 8)(x), set_bits(shifted, 8)(x))        # random shifts, yet none at the highest bit-width
        assert not torch.equal(set_bits(plain, 3)(x), set_bits(shifted, 3)(x))
        with quant_state(shifted, weights=False, acts=False), quant_state(plain, weights=False, acts=False):
            assert torch.equal(plain(x), shifted(x))                            # the float model has no shift

def test_the_highest_row_with_lower_passes_the_output_through_equal_to_the_formula():
    "With rows 'lower' the highest row returns the layer's output itself (no arithmetic): equal to x * (1 + g) + d with that row's zeros, gradient included."
    _, shifted = _pair(lambda: CifarResNet(20), 'lower', gain=True)
    layer = shifted.units[1].body[0]
    bb, i = layer.bit_bias, BITS.index(8)
    set_bits(shifted, 8)
    h = torch.randn(2, 16, 8, 8)
    assert bb(h) is h
    bb.requires_grad_(True)
    d, g = (bb.delta * bb.mask)[i].view(1, -1, 1, 1), (bb.gain * bb.mask)[i].view(1, -1, 1, 1)
    assert torch.equal(bb(h), h * (1 + g) + d)
    (h * (1 + g) + d).sum().backward()                                         # the formula's gradient on that row: zero
    assert not bb.delta.grad[i].any() and not bb.gain.grad[i].any()
    set_bits(shifted, 3)
    assert bb(h) is not h and not torch.equal(bb(h), h)                      # the lower rows still shift

def test_batched_tuple_plan_and_direct_index():
    _, qm = _pair(lambda: CifarResNet(20), 'all')
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        sep = [set_bits(qm, b)(x) for b in BITS]
        unit, xs = qm.units[2], [torch.randn(2, 16, 32, 32) for _ in BITS]
        one = [set_bits(unit, b)(xi) for b, xi in zip(BITS, xs)]
        batched = set_bits(unit, BITS)(torch.cat(xs)).chunk(3)
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(one, batched))
        slots = plan_slots(qm)
        plan = [3 if s.unit % 2 else 8 for s in slots]                          # alternate units at 3 and 8 bits
        mixed = set_bits(qm, plan)(x)
        h = x
        for k, u in enumerate(qm.units): h = set_bits(u, 3 if k % 2 else 8)(h)
        assert torch.equal(mixed, h)
        q = next(s.q for s in slots if s.unit == 1)
        set_bits(qm, 8); q.idx = q.index(3)                                     # a quantizer set directly (as the sensitivity does)
        shift, h = qm.units[1].body[1].bit_bias, torch.randn(2, 16, 8, 8)
        assert shift.src is q and torch.equal(shift(h), h + shift.delta[0].view(1, -1, 1, 1))
        assert torch.equal(set_bits(qm, 3)(x), sep[0])

def test_forward_bits_with_shifts_equals_separate_passes():
    _, qm = _pair(lambda: CifarResNet(20), 'lower')
    blk, x = qm.units[4], torch.randn(2, 16, 32, 32)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(blk.forward_bits(x, BITS), [set_bits(blk, b)(x) for b in BITS]))

def test_freeze_save_load_and_export_keep_the_shifts_exactly(tmp_path):
    _, qm = _pair(lambda: CifarResNet(20), 'lower')
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(): ref = {b: set_bits(qm, b)(x) for b in BITS}
    with torch.no_grad():
        for b in BITS:
            assert torch.equal(freeze_bits(qm, b)(x), ref[b])
            assert torch.equal(export_module(qm, b)(x), ref[b])
    check_rebuild(qm)
    save(qm, tmp_path / 'm.safetensors')
    assert read_metadata(tmp_path / 'm.safetensors')['spec']['bit_bias'] == 'lower'
    back = load(tmp_path / 'm.safetensors')
    assert back.metadata['format_version'] == 3 and _shifts(back)
    with torch.no_grad():
        for b in BITS: assert torch.equal(set_bits(back, b)(x), ref[b]), f"A{b} differs after load"
    plain = quantize_model(CifarResNet(20), 4, BITS)
    set_weight_mode(plain, 'hard')
    save(plain, tmp_path / 'p.safetensors')
    assert read_metadata(tmp_path / 'p.safetensors')['format_version'] == 2      # no shifts: readable by format-2 readers

def test_calibration_trains_the_lower_rows_only_and_is_deterministic():
    torch.manual_seed(0)
    fp, calib = CifarResNet(8).eval(), torch.randn(16, 3, 32, 32)
    cfg = PTMQConfig(w_bits=4, iters=4, batch_size=4, observe_images=8, groups={'low': [3], 'mid': [4], 'high': [8]},
                     step_passes='one', bit_bias='lower', lr_bias=1e-2, seed=1)
    a, b = ptmq(fp, calib, cfg, progress=False), ptmq(fp, calib, cfg, progress=False)
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    for s in _shifts(a):
        assert torch.count_nonzero(s.delta[2]) == 0 and not s.delta.requires_grad
    assert any(torch.count_nonzero(s.delta[:2]) > 0 for s in _shifts(a))

def test_bit_bias_errors():
    with pytest.raises(ValueError, match="bit_bias must be one of"): PTMQConfig(bit_bias='some')
    with pytest.raises(ValueError, match='single-bit calibration'): PTMQConfig(bit_bias='all', single_bits=4)
    assert PTMQConfig(single_bits=4, bit_bias='lower').shifts == 'none' and not _shifts(quantize_model(CifarResNet(8), 4, (4,), bit_bias='lower'))   # no lower bit-width, no shift
    one = PTMQConfig(iters=0, groups={'low': [3], 'mid': [4], 'high': [8]}, single_bits=4, bit_bias='lower', observe_images=4)
    assert calibrate(quantize_model(CifarResNet(8), 4, (4,)), torch.randn(4, 3, 32, 32), one, progress=False).images == 4   # accepted on a model without shifts
    with pytest.raises(ValueError, match='lr_bias must be > 0'): PTMQConfig(lr_bias=0.0)
    with pytest.raises(ValueError, match="bit_bias must be one of"): quantize_model(CifarResNet(8), 4, BITS, bit_bias='yes')
    qm = quantize_model(CifarResNet(8), 4, BITS)
    with pytest.raises(ValueError, match="asks bit_bias='lower', the model was built with 'none'"):
        calibrate(qm, torch.randn(4, 3, 32, 32), PTMQConfig(iters=0, groups={'low': [3], 'mid': [4], 'high': [8]}, bit_bias='lower'))
    with pytest.raises(ValueError, match='cannot follow a quantizer'):
        BitBias((3, 8), 4).link(act_quantizers(qm)[0])

@pytest.mark.parametrize('gain', [False, True], ids=['shifts', 'shifts_and_gains'])
def test_onnx_export_with_shifts(tmp_path, gain):
    from ptmq.export import export_onnx, _session
    _, qm = _pair(lambda: CifarResNet(20), 'lower', gain=gain)
    assert all((b.gain is not None) == gain for b in _shifts(qm))
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad(): ref = set_bits(qm, 3)(x)
    f = export_onnx(qm, tmp_path / 'a3.onnx', 3, input_size=(3, 32, 32))
    out = torch.from_numpy(_session(f, exact=True).run(None, {'input': x.numpy()})[0])
    d = (out - ref).abs()
    assert d.median() < 1e-5 and d.max() < 0.05 * ref.abs().max(), f"onnxruntime differs beyond float rounding ({d.max():.2e})"
