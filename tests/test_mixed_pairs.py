"""Mixed precision over (weight, activation) pairs (issues 13 and 16): a weight-set model's plan gives each slot a pair, its
activations and the weights of the layers it feeds. Which weights a slot feeds, switching invariants, costs by hand, the pair
sensitivity against a direct computation, the study, save/load, export, and bad plans."""
import json
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from ptmq.models import CifarResNet
from ptmq.recon import PTMQConfig, round_to_nearest
from ptmq.blocks import set_bits, plan_slots, weight_quantizers
from ptmq.mixed import (BitPlan, PairPlan, parse_plan, check_plan, set_plan, weight_feeds, plan_costs, sensitivity, mixed_precision,
                        front_table, Sensitivity)
import ptmq

PAIRS = [(3, 3), (4, 4), (8, 8)]
CFG = PTMQConfig(w_bits=8, pairs=[f'W{w}A{a}' for w, a in PAIRS], head_q='pooled')   # 7 slots: every block output switchable

@pytest.fixture(scope='module')
def w8():
    torch.manual_seed(0)
    fp = CifarResNet(8).eval()
    with torch.no_grad(): fp.linear.weight.mul_(30)                         # confident outputs: KL divergences well above rounding
    qm = round_to_nearest(fp, torch.randn(32, 3, 32, 32), CFG)
    weight_feeds(qm, torch.zeros(1, 3, 32, 32))
    return qm

PLAN = PairPlan(((8, 8), (3, 3), (4, 4), (8, 8), (4, 4), (3, 3), (8, 8)))

def test_weight_feeds_are_the_layers_each_slot_feeds(w8):
    # ResNet-8 (akamaster, option-A shortcuts: no shortcut convs): the stem's output feeds block 1's first conv, each block's
    # inner activation its second conv, each block's output the next block's first conv; the last output only the 8-bit head
    assert w8.plan_feeds == [['units.1.body.0'], ['units.1.body.1'], ['units.2.body.0'], ['units.2.body.1'], ['units.3.body.0'], ['units.3.body.1'], []]
    named = dict(w8.named_modules())
    switchable = {n for n, m in named.items() if hasattr(m, 'wq') and m.wq.switchable}
    assert sorted(n for f in w8.plan_feeds for n in f) == sorted(switchable)      # every switchable weight exactly once
    assert not named['units.0.0'].wq.switchable and not named['units.4.fc'].wq.switchable      # first and last layers keep 8 bits

def test_pair_plan_switching_is_exact_and_reversible(w8):
    x = torch.randn(3, 3, 32, 32)
    named = dict(w8.named_modules())
    with torch.no_grad():
        a = set_plan(w8, PLAN)(x)
        assert w8.w_bits is None                                                 # the weights are mixed
        for names, (w, b), s in zip(w8.plan_feeds, PLAN, plan_slots(w8)):
            assert s.q.current_bits == b and all(named[n].wq.bits == w for n in names)
        set_bits(w8, 4, w=3); set_plan(w8, PairPlan(((3, 3),) * 7))
        assert torch.equal(set_plan(w8, PLAN)(x), a)                             # plan -> others -> plan: bit-identical
        assert torch.equal(set_plan(w8, 'W8A8-W3A3-W4A4-W8A8-W4A4-W3A3-W8A8')(x), a)   # the text form is the same plan
        assert torch.equal(set_plan(w8, [[8, 8], [3, 3], [4, 4], [8, 8], [4, 4], [3, 3], [8, 8]])(x), a)
        for w, b in PAIRS:
            assert torch.equal(set_plan(w8, PairPlan.uniform(w8, w, b))(x), set_bits(w8, b, w=w)(x))
            assert w8.w_bits == w
        set_plan(w8, [(3, 3)] * 6 + [(8, 8)])                                    # the last slot feeds no weights: all weights at 3 bits
        assert w8.w_bits == 3
        assert torch.equal(set_plan(w8, BitPlan((4,) * 7))(x), set_bits(w8, 4)(x))   # an activation plan still works
        assert not torch.equal(a, set_bits(w8, 8, w=8)(x))

def test_pair_plan_text_and_parse():
    p = PairPlan.parse('W4A4-W8A8')
    assert p.pairs == ((4, 4), (8, 8)) and str(p) == 'W4A4-W8A8' and p.to_list() == ['W4A4', 'W8A8'] and p.a_plan == BitPlan((4, 8))
    assert PairPlan.parse(p.to_list()) == p == PairPlan.parse([(4, 4), [8, 8]]) == parse_plan('W4A4-W8A8') == parse_plan([[4, 4], [8, 8]])
    assert parse_plan('4-8') == BitPlan((4, 8)) and parse_plan([4, 8]) == BitPlan((4, 8))
    with pytest.raises(ValueError, match="written \\[w, a\\] or 'WwAa'"): PairPlan.parse('W4A4-X8')
    with pytest.raises(ValueError, match='integers in 2..8'): PairPlan.parse([[4, 9]])
    with pytest.raises(ValueError, match='non-empty'): PairPlan(())

def test_bad_pair_plans_get_clear_errors(w8):
    with pytest.raises(ValueError, match=r'one \(w, a\) pair per switchable activation quantizer \(7\), got 2'): set_plan(w8, 'W4A4-W8A8')
    with pytest.raises(ValueError, match=r"pair\(s\) \['W6A4'\] not calibrated in this model: weights \[3, 4, 8\], activations \[3, 4, 8\]"):
        set_plan(w8, ['W6A4'] + ['W8A8'] * 6)
    torch.manual_seed(0)
    bare = round_to_nearest(CifarResNet(8).eval(), torch.randn(8, 3, 32, 32), CFG)
    with pytest.raises(ValueError, match=r'no map of which weights each plan slot feeds: run ptmq.mixed.weight_feeds'): set_plan(bare, PLAN)
    before = [q.idx for q in weight_quantizers(w8)]
    with pytest.raises(ValueError): set_plan(w8, PLAN.to_list()[:-1] + ['W2A2'])
    assert [q.idx for q in weight_quantizers(w8)] == before                          # checked before anything changes

def test_pair_costs_by_hand(w8):
    c = plan_costs(w8, torch.zeros(2, 3, 32, 32))
    macs = lambda cout, h, cin, k=3: cout * h * h * cin * k * k
    feeds = [macs(16, 32, 16), macs(16, 32, 16), macs(32, 16, 16), macs(32, 16, 32), macs(64, 8, 32), macs(64, 8, 64), 0]
    fixed = macs(16, 32, 3) * 8 * 8 + 64 * 10 * 8 * 8                             # stem: 8-bit weights on the 8-bit image; head 8 x 8
    assert c.macs.tolist() == feeds and c.fixed_bops == fixed and c.fixed_wmacs.tolist() == [0] * 7
    assert c.bops(PLAN) == fixed + sum(w * a * m for (w, a), m in zip(PLAN, feeds))
    assert c.avg_w_bits(PLAN) == pytest.approx(sum(w * m for (w, _), m in zip(PLAN, feeds)) / sum(feeds))
    assert c.avg_bits(PLAN) == c.avg_bits(PLAN.a_plan)
    for w, a in PAIRS:                                                              # a uniform pair plan costs what set_bits(a, w=w) does
        set_bits(w8, a, w=w)
        assert c.bops(PairPlan.uniform(w8, w, a)) == plan_costs(w8, torch.zeros(1, 3, 32, 32)).bops(BitPlan.uniform(w8, a))
    cost, const = c.table(PAIRS, 'bops')
    assert const == fixed and cost.shape == (7, 3) and cost[1].tolist() == [9 * feeds[1], 16 * feeds[1], 64 * feeds[1]]

def test_pair_sensitivity_is_kl_of_one_lowered_slot(w8):
    x = torch.randn(6, 3, 32, 32)
    s = sensitivity(w8, x, batch_size=4, pairs=PAIRS)
    assert s.bits == tuple(PAIRS) and s.kl.shape == (7, 3) and (s.kl[:, -1] == 0).all()
    with torch.no_grad():
        ref = F.log_softmax(set_bits(w8, 8, w=8)(x), -1)
        for k, j in ((1, 0), (4, 1), (6, 0)):
            plan = [(8, 8)] * 7; plan[k] = PAIRS[j]
            low = F.log_softmax(set_plan(w8, plan)(x), -1)
            assert s.kl[k, j] == pytest.approx(float(F.kl_div(low, ref, log_target=True, reduction='sum')) / 6, rel=1e-4)
    assert s.kl[1, 0] > s.kl[1, 1] > 0                                                 # W3A3 hurts more than W4A4
    assert Sensitivity.from_dict(json.loads(json.dumps(s.to_dict()))).bits == s.bits  # pairs survive JSON
    with pytest.raises(ValueError, match='lowest pair must be at or below'): sensitivity(w8, x, pairs=[(3, 8), (4, 4), (8, 8)])
    with pytest.raises(ValueError, match=r"pair\(s\) \['W6A6'\] not calibrated"): sensitivity(w8, x, pairs=[(3, 3), (6, 6)])

def test_mixed_precision_over_pairs(w8):
    torch.manual_seed(1)
    x = torch.randn(32, 3, 32, 32)
    with torch.no_grad(): ref = set_bits(w8, 8, w=8)(x).argmax(1)
    def agree(m):
        with torch.no_grad(): return float((m(x).argmax(1) == ref).float().mean() * 100)
    set_bits(w8, 4, w=4)
    out = mixed_precision(w8, x[:8], agree, [0.3, 0.6], kind='bops', n_random=2, pairs=['W3A3', 'W4A4', 'W8A8'])
    assert w8.w_bits == 4 and [s.q.current_bits for s in plan_slots(w8)] == [4] * 7   # the model comes back as it was
    rows = out['rows']
    assert [(r['method'], r['w_bits'], r['a_bits']) for r in rows[:3]] == [('ptmq_wset', w, a) for w, a in PAIRS]
    full = out['costs'].bops(PairPlan.uniform(w8, 8, 8))
    for r in rows[3:]:
        assert r['method'] in ('ptmq_mp', 'random_mp') and r['a_bits'] is None and r['bops'] <= r['budget'] * full * (1 + 1e-9)
        plan = PairPlan.parse(r['plan'])
        assert r['predicted_kl'] == pytest.approx(out['sensitivity'].total(plan), abs=1e-6)
        assert r['avg_w_bits'] == pytest.approx(out['costs'].avg_w_bits(plan), abs=1e-4)
        ws = {w for f, (w, _) in zip(w8.plan_feeds, plan) if f}                  # the last slot feeds no weights
        assert r['w_bits'] == (ws.pop() if len(ws) == 1 else None)
    for b in (0.3, 0.6):                                                           # the front's plan predicts no worse than random ones
        front = next(r for r in rows if r['method'] == 'ptmq_mp' and r['budget'] == b)
        assert all(front['predicted_kl'] <= r['predicted_kl'] + 1e-12 for r in rows if r['method'] == 'random_mp' and r['budget'] == b)
    assert set(out['plans']) == {'bops_0.3', 'bops_0.6'} and all(isinstance(p, PairPlan) for p in out['plans'].values())
    t = front_table(rows, 'bops')
    assert list(t['plan']) == [str(p) for p in out['plans'].values()] and t['uniform line'].notna().all()

def test_saved_model_carries_pair_plans_and_exports_one(w8, tmp_path):
    from ptmq.export import export_module, export_command
    w8.plans = {'edge': PLAN, 'acts': BitPlan((4,) * 7)}
    try: ptmq.save(w8, tmp_path / 'm.safetensors', data_config={'input_size': [3, 32, 32]})
    finally: del w8.plans
    meta = ptmq.read_metadata(tmp_path / 'm.safetensors')
    assert meta['plans'] == {'edge': PLAN.to_list(), 'acts': [4] * 7} and meta['plan_feeds'] == w8.plan_feeds
    back = ptmq.load(tmp_path / 'm.safetensors')
    assert back.plans == {'edge': PLAN, 'acts': BitPlan((4,) * 7)} and back.plan_feeds == w8.plan_feeds
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(set_plan(back, back.plans['edge'])(x), set_plan(w8, PLAN)(x))
        assert torch.equal(export_module(back, PLAN)(x), set_plan(back, PLAN)(x))
    res = export_command(tmp_path / 'm.safetensors', plan='edge')
    import onnx
    props = {p.key: p.value for p in onnx.load(res['onnx']).metadata_props}
    assert props['ptmq.a_bits'] == f'plan {PLAN}' and props['ptmq.w_bits'] == 'mixed (the plan)'
    with pytest.raises(ValueError, match=r"plan 'edge' gives each slot a \(w, a\) pair, so it sets the weights itself"):
        export_command(tmp_path / 'm.safetensors', plan='edge', w_bits=4)

@pytest.mark.parametrize('bad, msg', [
    ([['units.1.body.0']] * 6 + [['units.4.fc']], r"plan_feeds names \['units.4.fc'\], which are not layers with switchable weights"),   # the 8-bit head
    ([['units.1.body.0']] * 6 + [[]], r"every layer with switchable weights exactly once: missing \['units.1.body.1', 'units.2.body.0', 'units.2.body.1'\], repeated \['units.1.body.0'\]"),
    ([['units.1.body.0']], r'for each of the 7 plan slots')])
def test_a_stored_plan_map_that_does_not_fit_is_refused(w8, tmp_path, bad, msg):
    from ptmq.serialize import ModelFileError
    feeds = w8.plan_feeds
    try:
        w8.plan_feeds = bad
        ptmq.save(w8, tmp_path / 'bad.safetensors')
    finally: w8.plan_feeds = feeds
    with pytest.raises(ModelFileError, match=msg): ptmq.load(tmp_path / 'bad.safetensors')

def test_pair_choices_are_ordered_by_bops(w8):
    from ptmq.mixed import _pair_choices
    assert _pair_choices(w8, ['W8A8', 'W4A3', [np.int64(3), np.int64(4)], 'W3A3', 'W4A8']) == ((3, 3), (3, 4), (4, 3), (4, 8), (8, 8))
    with pytest.raises(ValueError, match='integers in 2..8'): _pair_choices(w8, [(3.0, 3), (8, 8)])

def test_params_accept_mixed_precision_with_pairs():
    from conftest import REPO
    from ptmq.experiment import load_params
    p = load_params(REPO / 'params' / 'default.yaml', ['ptmq.pairs=[W2A2, W3A3, W4A4]', 'mixed_precision={budget: bops, budgets: 3}'], check_paths=False)
    assert p.mixed_precision.budget_list(p.ptmq.a_bits, p.ptmq.pairs.pairs) == [0.4375, 0.625, 0.8125]   # between 2x2/4x4 and 1

def test_ptmq_run_mixed_precision_over_pairs_then_from_the_kept_model(tmp_path, fresh_cache):
    "`ptmq run` with pairs and a mixed_precision section: pair-plan rows, a kept model with its plans; then the same study from that model."
    from conftest import REPO
    from ptmq.runner import run
    study = ['ptmq.iters=2', 'calib_images=64', 'ptmq.pairs=[W2A2, W3A3, W4A4]', 'deploy.save=true', 'deploy.onnx=false',
             'mixed_precision={budget: bops, budgets: [0.5, 0.75], random_plans: 1, sensitivity_images: 16}']
    out = run(REPO / 'params' / 'default.yaml', study, tmp_path / 'reports', threads=1)
    rec = json.loads((out / 'results.json').read_text())
    mp = [r for r in rec['results'] if r['method'] == 'ptmq_mp']
    assert [r['budget'] for r in mp] == [0.5, 0.75] and all(r['a_bits'] is None and 'avg_w_bits' in r and set(r['line_se']) == {'avg_a_bits', 'bops'} for r in mp)
    uni = [r for r in rec['results'] if r['method'] == 'ptmq_wset']
    assert [(r['w_bits'], r['a_bits']) for r in uni] == [(2, 2), (3, 3), (4, 4)] and all(r['plan'][0] == f"W{r['w_bits']}A{r['a_bits']}" for r in uni)
    assert rec['mixed_precision']['sensitivity']['bits'] == ['W2A2', 'W3A3', 'W4A4']
    back = ptmq.load(out / 'model.safetensors')
    assert {k: v.to_list() for k, v in back.plans.items()} == rec['mixed_precision']['plans'] and back.plan_feeds
    again = run(REPO / 'params' / 'default.yaml', study + ['name=again', f"model_file={out / 'model.safetensors'}"], tmp_path / 'reports', threads=1)
    rec2 = json.loads((again / 'results.json').read_text())
    assert [r['top1'] for r in rec2['results'] if r['method'] == 'ptmq_wset'] == [r['top1'] for r in uni]   # the same model, not a new calibration
    assert rec2['mixed_precision']['plans'] == rec['mixed_precision']['plans']
