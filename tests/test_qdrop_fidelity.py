"QDrop's setting in ptmq: drop inside the unit, the activation held at 8 bits, QDrop's MSE search, float observation."
import math
import pytest, torch
from ptmq.quant import ActQuantizer, fake_quant, mse_qparams, mse_grid_qparams, observe
from ptmq.blocks import act_quantizers, set_bits, hold_last_activation, QuantSpec
from ptmq.arch import quantize_model
from ptmq.models import CifarResNet
from ptmq.recon import PTMQConfig, ptmq


def _observed(bits=(4, 8)):
    g = torch.Generator().manual_seed(0)
    x = torch.relu(torch.randn(8, 16, 8, 8, generator=g))
    aq = ActQuantizer(bits)
    for i in range(len(bits)):
        aq.idx = i; aq.observer = ('mse', 2.0); aq(x)
    aq.idx = 0
    return aq, x


def test_no_drop_is_plain_fake_quantization():
    aq, x = _observed()
    with torch.no_grad():
        plain = fake_quant(x, aq.scale[0], aq.zero_point[0], 0, 15)
        assert torch.allclose(aq(x), plain, atol=1e-6, rtol=0)
        aq.drop_gen = torch.Generator().manual_seed(1)   # a generator alone changes nothing
        assert torch.allclose(aq(x), plain, atol=1e-6, rtol=0)


def test_drop_one_passes_float_and_drop_zero_quantizes():
    aq, x = _observed()
    aq.drop, aq.drop_gen = 1.0, torch.Generator().manual_seed(0)
    with torch.no_grad(): assert torch.equal(aq(x), x)
    aq.idx = (0, 1)                                   # the batched multi-bit pass drops the same way
    with torch.no_grad(): assert torch.equal(aq(torch.cat([x, x])), torch.cat([x, x]))


@pytest.mark.parametrize('p', [0.25, 0.5, 0.8])
def test_fraction_kept_quantized_matches_probability(p):
    # elements strictly inside a step (never on the grid) are float or quantized, never both
    g = torch.Generator().manual_seed(3)
    aq = ActQuantizer((4,))
    aq.scale.data[0], aq.zero_point[0] = 0.1, 0.0
    x = (torch.randint(0, 15, (200_000,), generator=g) + 0.3) * 0.1      # 0.3 of a step off the grid
    aq.drop, aq.drop_gen = p, torch.Generator().manual_seed(4)
    with torch.no_grad(): y = aq(x)
    is_float = (y == x)
    is_quant = torch.isclose(y, torch.round(x / 0.1) * 0.1, atol=1e-6, rtol=0)
    assert not (is_float & is_quant).any() and (is_float | is_quant).all()
    n = x.numel(); sd = math.sqrt(p * (1 - p) / n)
    # our `drop` is P(float); QDrop's drop_prob is P(quantized) = 1 - drop
    assert abs(is_float.float().mean().item() - p) < 5 * sd
    assert abs(is_quant.float().mean().item() - (1 - p)) < 5 * sd


def test_drop_gradient_reaches_the_step_through_quantized_elements_only():
    aq, x = _observed((4,))
    aq.drop, aq.drop_gen = 1.0, torch.Generator().manual_seed(0)
    aq(x).sum().backward()
    assert aq.scale.grad is not None and aq.scale.grad.abs().sum() == 0


def _calibrate_seeing(cfg, monkeypatch, what):
    "Calibrate a small random ResNet under `cfg`, keeping `what(quantizer)` at every activation quantizer call (None: nothing)."
    import ptmq.recon as R
    torch.manual_seed(0)
    fp = CifarResNet(8).eval()
    calib = torch.randn(16, 3, 32, 32)
    seen, orig = set(), R.ActQuantizer.forward
    def spy(self, x):
        if (v := what(self)) is not None: seen.add(v)
        return orig(self, x)
    monkeypatch.setattr(R.ActQuantizer, 'forward', spy)
    qm = ptmq(fp, calib, cfg, progress=False)
    monkeypatch.setattr(R.ActQuantizer, 'forward', orig)
    return qm, calib, seen


@pytest.mark.parametrize('single,block_drop,expect', [(4, None, {0.0, 0.5}), (4, False, {0.0}), (None, None, {0.0}), (None, True, {0.0, 0.5})])
def test_drop_inside_the_unit_only_during_reconstruction(single, block_drop, expect, monkeypatch):
    cfg = PTMQConfig(w_bits=4, groups={'low': [4], 'mid': [6], 'high': [8]}, iters=3, batch_size=4, observe_images=8,
                     single_bits=single, block_drop=block_drop)
    qm, calib, seen = _calibrate_seeing(cfg, monkeypatch, lambda q: q.drop)
    assert seen == expect
    assert all(q.drop == 0.0 and q.drop_gen is None for q in act_quantizers(qm))      # none outside reconstruction
    set_bits(qm, single or 4)
    with torch.no_grad(): assert torch.equal(qm(calib[:4]), qm(calib[:4]))      # deterministic after it


def test_drop_inside_the_unit_is_reset_when_reconstruction_fails(monkeypatch):
    torch.manual_seed(0)
    import ptmq.recon as R
    from ptmq.arch import quantize_model
    cfg = PTMQConfig(w_bits=4, groups={'low': [4], 'mid': [6], 'high': [8]}, iters=5, batch_size=4, observe_images=8, single_bits=4)
    qm = quantize_model(CifarResNet(8).eval(), 4, (4,), head_q='last')
    calls = []
    def boom(*a, **k):
        calls.append(1)
        if len(calls) == 2: raise RuntimeError('interrupted')
        return orig(*a, **k)
    orig = R.beta_schedule
    monkeypatch.setattr(R, 'beta_schedule', boom)
    with pytest.raises(RuntimeError, match='interrupted'): R.calibrate(qm, torch.randn(16, 3, 32, 32), cfg, progress=False)
    assert all(q.drop == 0.0 and q.drop_gen is None for q in act_quantizers(qm))


def test_drop_in_block_rule():
    assert PTMQConfig(single_bits=4).drop_in_block == 0.5              # QDrop
    assert PTMQConfig(single_bits=4, drop_prob=0.0).drop_in_block == 0.0  # BRECQ-style: no drop anywhere
    assert PTMQConfig().drop_in_block == 0.0                           # PTMQ: off unless asked
    assert PTMQConfig(block_drop=True, drop_prob=0.3).drop_in_block == 0.3
    with pytest.raises(ValueError, match='block_drop'): PTMQConfig(block_drop='yes')
    with pytest.raises(ValueError, match='head_q'): PTMQConfig(head_q='fc')
    with pytest.raises(ValueError, match='observe_on'): PTMQConfig(observe_on='fp')


def test_head_q_last_holds_the_last_block_output_at_8_bits():
    fp = CifarResNet(20).eval()
    last = quantize_model(fp, 4, (4, 6, 8))
    q = last.units[-2].out_q
    assert q.bits == (8,) and not q.switchable and last.units[-1].fc.in_q is None
    strict = quantize_model(fp, 4, (4, 6, 8), head_q='pooled')
    assert strict.units[-2].out_q.switchable and strict.units[-1].fc.in_q.bits == (8,)
    # one switchable quantizer fewer; everything else identical
    n = lambda m: sum(q.switchable for q in act_quantizers(m))
    assert n(strict) - n(last) == 1
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for b in (4, 8):
            set_bits(last, b); set_bits(strict, b)
            assert last(x).shape == strict(x).shape == (2, 10)
    with pytest.raises(ValueError, match='head_q'): QuantSpec(4, (4,), head_q='x')


def test_head_q_on_a_vit_changes_nothing():
    timm = pytest.importorskip('timm')
    from timm.models.vision_transformer import VisionTransformer
    vit = VisionTransformer(img_size=16, patch_size=8, num_classes=3, embed_dim=16, depth=1, num_heads=2).eval()
    a, b = quantize_model(vit, 4, (4, 8)), quantize_model(vit, 4, (4, 8), head_q='pooled')
    assert [q.bits for q in act_quantizers(a)] == [q.bits for q in act_quantizers(b)]
    assert hold_last_activation(list(b.units)) is None


def _grid_by_definition(x, bits, per_channel, p, grid=100):
    "QDrop's 2-D search written out: every (range, zero point), strict improvement, ranges then zero points ascending."
    rows = x if per_channel else x.reshape(1, -1)
    qmax, out_s, out_z = 2 ** bits - 1, [], []
    for r in rows:
        lo, hi = min(r.min().item(), 0.0), max(r.max().item(), 0.0)
        best = (None, None, float('inf'))
        for i in range(1, grid + 1):
            s = torch.tensor(max((hi - lo) * (i / grid) / qmax, 1e-8))
            for zp in range(qmax + 1):
                err = (fake_quant(r, s, torch.tensor(float(zp)), 0, qmax) - r).abs().pow(p).mean().item()
                if err < best[2]: best = (s.item(), zp, err)
        out_s.append(best[0]); out_z.append(best[1])
    return torch.tensor(out_s), torch.tensor(out_z, dtype=torch.float)


@pytest.mark.parametrize('bits,p', [(2, 2.4), (3, 2.0)])
def test_mse_grid_is_qdrops_search(bits, p):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 40, generator=g) + torch.tensor([[0.5], [0.0], [-0.4]])
    s, z = mse_grid_qparams(w, bits, per_channel=True, p=p, grid=20)
    es, ez = _grid_by_definition(w, bits, True, p, grid=20)
    assert torch.allclose(s, es, rtol=1e-5) and torch.equal(z, ez)
    # the zero points of a step are scored in batches: any batch size, and a whole tensor, give the same search
    small = mse_grid_qparams(w, bits, per_channel=True, p=p, grid=20, max_elems=w.numel())       # one zero point at a time
    assert torch.equal(small[0], s) and torch.equal(small[1], z)
    flat = w[:2].flatten()
    ts, tz = mse_grid_qparams(flat, bits, p=p, grid=20)
    es, ez = _grid_by_definition(flat, bits, False, p, grid=20)
    assert ts.shape == () and torch.allclose(ts, es[0], rtol=1e-5) and tz.item() == ez.item()
    r = torch.relu(torch.randn(500, generator=g))          # one sign: the same ranges as mse_qparams
    assert all(torch.equal(u, v) for u, v in zip(mse_grid_qparams(r, 4, p=p), mse_qparams(r, 4, p=p)))
    with pytest.raises(ValueError, match='mse_grid'): observe(w, 4, 'mse2d')


def test_observe_on_float_uses_the_float_activations():
    torch.manual_seed(0)
    fp = CifarResNet(8).eval()
    calib = torch.randn(16, 3, 32, 32)
    cfg = PTMQConfig(w_bits=4, groups={'low': [4], 'mid': [6], 'high': [8]}, iters=0, observe_images=16)
    assert cfg.observe_on == 'float' and cfg.observer == 'mse_grid' and cfg.observer_p == 2.4     # QDrop's settings are the defaults
    qm = ptmq(fp, calib, cfg, progress=False)
    # the stem's output quantizer sees relu(folded conv(x)) of the float model
    stem = qm.units[0][0]
    with torch.no_grad():
        stem.wq.enabled = False; seen = stem.pre(calib); stem.wq.enabled = True
    q = stem.out_q
    for i, b in enumerate(q.bits):
        s, z = observe(seen.flatten(), b, cfg.a_observer, p=cfg.observer_p)
        assert torch.allclose(q.scale.data[i], s) and q.zero_point[i] == z


@pytest.mark.parametrize('head_q', ['last', 'pooled'])
def test_both_head_settings_save_and_load_bit_exact(head_q, tmp_path):
    from ptmq.serialize import save, load
    torch.manual_seed(0)
    cfg = PTMQConfig(w_bits=4, groups={'low': [4], 'mid': [6], 'high': [8]}, iters=0, observe_images=8, head_q=head_q)
    qm = ptmq(CifarResNet(8).eval(), torch.randn(8, 3, 32, 32), cfg, progress=False)
    save(qm, tmp_path / 'm.safetensors')
    back = load(tmp_path / 'm.safetensors')
    assert back.spec.head_q == head_q
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for b in (4, 8): assert torch.equal(set_bits(qm, b)(x), set_bits(back, b)(x))


def test_plan_costs_see_the_held_last_activation():
    from ptmq.mixed import plan_costs
    from ptmq.blocks import plan_slots
    qm = quantize_model(CifarResNet(8).eval(), 4, (4, 6, 8))
    c = plan_costs(qm, torch.randn(1, 3, 32, 32))
    fc = [r for r in c.layers if r['name'].endswith('fc')]
    assert len(fc) == 1 and fc[0]['input'] == 'fixed 8-bit' and fc[0]['a_bits'] == 8
    assert len(plan_slots(qm)) == 6 and len(c.elems) == 6      # stem, 3 inner, 2 block outputs: the last is held at 8 bits


def test_block_drop_as_a_list_of_passes():
    assert PTMQConfig(block_drop=['high']).pass_drops == (0.0, 0.0, 0.5)
    assert PTMQConfig(block_drop=['mid', 'low'], drop_prob=0.3).block_drop == ['low', 'mid']       # in pass order
    assert PTMQConfig(block_drop=['mid', 'low'], drop_prob=0.3).pass_drops == (0.3, 0.3, 0.0)
    assert PTMQConfig(block_drop=['high']).drop_in_block == 0.0                                # no drop for every pass alike
    assert PTMQConfig(block_drop=True).pass_drops == (0.5,) * 3 and PTMQConfig().pass_drops == (0.0,) * 3
    for bad in ([], ['top'], ['high', 'high']):
        with pytest.raises(ValueError, match='block_drop as a list'): PTMQConfig(block_drop=bad)
    with pytest.raises(ValueError, match='single-bit run'): PTMQConfig(block_drop=['high'], single_bits=4)


@pytest.mark.parametrize('step_passes', ['all', 'one'])
def test_drop_inside_the_unit_only_in_the_named_passes(step_passes, monkeypatch):
    cfg = PTMQConfig(w_bits=4, groups={'low': [4], 'mid': [6], 'high': [8]}, iters=6, batch_size=4, observe_images=8,
                     block_drop=['high'], step_passes=step_passes)
    qm, _, seen = _calibrate_seeing(cfg, monkeypatch, lambda q: (q.bits[q.idx], q.drop) if q.switchable else None)
    assert {d for b, d in seen if b == 8} == {0.0, 0.5}          # the high pass drops (and the evaluations after it do not)
    assert {d for b, d in seen if b != 8} == {0.0} and {b for b, d in seen} == {4, 6, 8}
    assert all(q.drop == 0.0 and q.drop_gen is None for q in act_quantizers(qm))
