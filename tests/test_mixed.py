"Mixed precision: per-quantizer plans, their costs, sensitivity, the exact allocation, and plans carried by saved models."
import itertools
import numpy as np
import pytest
import torch
from timm.models.vision_transformer import VisionTransformer
from ptmq.models import CifarResNet
from ptmq.recon import PTMQConfig, round_to_nearest
from ptmq.blocks import set_bits, plan_slots, act_quantizers
from ptmq.mixed import (BitPlan, current_plan, plan_costs, sensitivity, pareto_front, random_plan, budget_grid, mixed_precision, front_summary,
                        Sensitivity, line_se, front_table, set_plan, plan_kl, measured_picks)
import ptmq

CFG = PTMQConfig(w_bits=4, groups={'low': [4], 'mid': [6], 'high': [8]}, head_q='pooled')   # every block output switchable: 7 slots

@pytest.fixture(scope='module')
def r8():
    torch.manual_seed(0)
    fp = CifarResNet(8).eval()
    with torch.no_grad(): fp.linear.weight.mul_(30)                         # confident outputs: KL divergences well above rounding
    return round_to_nearest(fp, torch.randn(32, 3, 32, 32), CFG)

def _vit():
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=16, patch_size=4, num_classes=10, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2).eval()
    return round_to_nearest(vit, torch.randn(16, 3, 16, 16), PTMQConfig(w_bits=4, groups={'low': [6], 'mid': [7], 'high': [8]}))

PLAN = BitPlan((4, 8, 6, 4, 6, 8, 4))                                       # ResNet-8: the stem's output, then inner and output of 3 blocks

def test_plan_slots_are_the_switchable_activation_quantizers(r8):
    slots = plan_slots(r8)
    assert [s.name for s in slots] == ['0.0.out_q'] + [f'{u}.{n}' for u in (1, 2, 3) for n in ('body.0.out_q', 'out_q')]
    assert [s.unit for s in slots] == [0, 1, 1, 2, 2, 3, 3]
    assert [s.q for s in slots] == [q for q in act_quantizers(r8) if q.switchable]

def test_plan_switching_is_an_exact_reversible_index_change(r8):
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        a = set_bits(r8, PLAN)(x)
        assert current_plan(r8) == PLAN
        set_bits(r8, 6); set_bits(r8, BitPlan((8, 8, 4, 6, 4, 4, 8)))
        assert torch.equal(set_bits(r8, PLAN)(x), a)                           # plan -> other plans -> plan: bit-identical
        assert torch.equal(set_bits(r8, list(PLAN))(x), a)                      # a plain list is the same plan
        assert torch.equal(set_bits(r8, {s.name: b for s, b in zip(plan_slots(r8), PLAN)})(x), a)   # and a dict {slot name: bits}
        for b in (4, 6, 8):
            assert torch.equal(set_bits(r8, BitPlan.uniform(r8, b))(x), set_bits(r8, b)(x))
        assert not torch.equal(a, set_bits(r8, 8)(x))
    # a plan entry sets exactly its quantizer
    set_bits(r8, PLAN)
    assert [s.q.current_bits for s in plan_slots(r8)] == list(PLAN)
    assert [q.current_bits for q in act_quantizers(r8.units[-1])] == [8]     # the classifier input stays fixed

def test_plan_text_form_round_trips():
    p = BitPlan.parse('4-6-8-4')
    assert p.bits == (4, 6, 8, 4) and str(p) == '4-6-8-4' and BitPlan.parse(str(p)) == p and p.to_list() == [4, 6, 8, 4]
    assert BitPlan.parse([np.int64(4), 6]) == BitPlan((4, 6))

@pytest.mark.parametrize('bad, msg', [('4-x-8', "joined by '-'"), ([], 'non-empty'), ([4, 9], '2..8'), ([4, True], '2..8')])
def test_bad_plan_text(bad, msg):
    with pytest.raises(ValueError, match=msg): BitPlan.parse(bad)

def test_bad_plans_get_clear_errors(r8):
    with pytest.raises(ValueError, match=r'one bit-width per switchable activation quantizer \(7\), got 3'): set_bits(r8, [4, 6, 8])
    with pytest.raises(ValueError, match=r'bit-width\(s\) \[5\] not calibrated in this model; available: \[4, 6, 8\]'): set_bits(r8, [4, 5, 8, 8, 8, 8, 8])
    names = [s.name for s in plan_slots(r8)]
    with pytest.raises(ValueError, match=r"exactly the 7 slot names .* missing \['3.out_q'\], unknown \['9.out_q'\]"):
        set_bits(r8, {n: 4 for n in names[:-1]} | {'9.out_q': 4})
    with pytest.raises(TypeError, match='QuantModel'): set_bits(r8.units[1], [4])

def test_plan_costs_by_hand(r8):
    c = plan_costs(r8, torch.zeros(2, 3, 32, 32))
    # activation elements per image of each slot's quantizer: stem output; each block's first conv output and its own output
    assert c.elems.tolist() == [16 * 32 * 32] * 3 + [32 * 16 * 16] * 2 + [64 * 8 * 8] * 2
    macs = lambda cout, h, cin, k=3: cout * h * h * cin * k * k
    fixed = macs(16, 32, 3) * 8 * 8 + 64 * 10 * 8 * 8                          # stem: 8-bit weights on the image (8 bits); classifier: 8 x 8
    feeds = {0: [macs(16, 32, 16)], 1: [macs(16, 32, 16)], 2: [macs(32, 16, 16)],   # which convs read each slot's output, at 4-bit weights
             3: [macs(32, 16, 32)], 4: [macs(64, 8, 32)], 5: [macs(64, 8, 64)], 6: []}  # (shortcuts are identity/padding: no MACs)
    plan = PLAN
    assert c.fixed_bops == fixed
    assert c.bops(plan) == fixed + sum(4 * m * b for u, b in enumerate(plan) for m in feeds[u])
    assert c.avg_bits(plan) == pytest.approx((16384 * (4 + 8 + 6) + 8192 * (4 + 6) + 4096 * (8 + 4)) / (3 * 16384 + 2 * 8192 + 2 * 4096))
    for b in (4, 6, 8): assert c.avg_bits(BitPlan.uniform(r8, b)) == pytest.approx(b)
    cost, const = c.table((4, 6, 8), 'bops')
    assert const + cost[np.arange(7), [(4, 6, 8).index(b) for b in plan]].sum() == pytest.approx(c.bops(plan))
    with pytest.raises(ValueError, match='unknown cost'): c.table((4, 6, 8), 'latency')

def test_plan_costs_on_a_vit():
    m = _vit()
    c = plan_costs(m, torch.zeros(1, 3, 16, 16))
    slots = plan_slots(m)
    assert len(c.elems) == len(slots) == 16 and {s.unit for s in slots} == {1, 2}   # 8 per block; the patch embedding reads the image at 8 bits
    assert all(l['input'] != 'float' for l in c.layers)
    for b in (6, 7, 8): assert c.avg_bits(BitPlan.uniform(m, b)) == pytest.approx(b)

def test_sensitivity_is_kl_of_one_lowered_quantizer(r8):
    x = torch.randn(24, 3, 32, 32)
    set_bits(r8, PLAN)
    s = sensitivity(r8, x, batch_size=10)
    assert current_plan(r8) == PLAN                                         # the model is left as it was
    assert s.bits == (4, 6, 8) and s.kl.shape == (7, 3) and (s.kl[:, -1] == 0).all() and (s.kl >= -1e-7).all() and s.images == 24
    with torch.no_grad():
        ref = torch.log_softmax(set_bits(r8, 8)(x), -1)
        low = torch.log_softmax(set_bits(r8, BitPlan((8, 8, 8, 4, 8, 8, 8)))(x), -1)   # the inner activation of block 2 lowered
    direct = float((ref.exp() * (ref - low)).sum(-1).mean())
    assert s.kl[3, 0] == pytest.approx(direct, rel=1e-4)
    assert s.total(BitPlan((8, 8, 8, 4, 6, 8, 8))) == pytest.approx(s.kl[3, 0] + s.kl[4, 1])
    assert s.kl[:, 0].min() > 1e-5                                         # far above float rounding (~1e-9)
    assert s.kl[:, 0].sum() > 2 * s.kl[:, 1].sum()                          # lowering further costs more (per slot on 24 images: noisy)
    back = Sensitivity.from_dict(s.to_dict())
    assert np.allclose(back.kl, s.kl) and np.allclose(back.uniform, s.uniform)
    with torch.no_grad():                                                   # every slot lowered at once, measured
        for j, b in enumerate((4, 6)):
            low = torch.log_softmax(set_bits(r8, b)(x), -1)
            assert s.uniform[j] == pytest.approx(float((ref.exp() * (ref - low)).sum(-1).mean()), rel=1e-4)
    assert s.uniform[-1] == 0 and np.allclose(s.additivity(), s.uniform[:2] / s.kl[:, :2].sum(0))
    sc = s.scaled()                                                         # columns scaled: each uniform plan's sum = its measured KL
    assert np.allclose(sc.kl[:, :2].sum(0), s.uniform[:2]) and np.allclose(sc.kl[:, :2] / s.kl[:, :2], s.additivity()[None])
    assert (sc.kl[:, -1] == 0).all() and sc.kl[3, 0] / sc.kl[4, 0] == pytest.approx(s.kl[3, 0] / s.kl[4, 0])
    with pytest.raises(ValueError, match='no uniform-plan KL'): Sensitivity(s.bits, s.kl, 24, 0.0).additivity()
    assert Sensitivity.from_dict({k: v for k, v in s.to_dict().items() if k != 'uniform'}).uniform is None   # files of before
    set_bits(r8, PLAN)

@pytest.mark.parametrize('seed', range(12))
def test_knapsack_front_equals_brute_force(seed):
    rng = np.random.default_rng(seed)
    U, B = int(rng.integers(2, 6)), int(rng.integers(2, 4))
    integer = seed % 2 == 0                                                   # integer costs: ties between plans
    cost = (rng.integers(1, 4, (U, B)) if integer else rng.uniform(0.5, 3, (U, B))).cumsum(1).astype(float)
    sens = rng.uniform(0, 1, (U, B))[:, ::-1].cumsum(1)[:, ::-1]
    if seed % 3 == 0: sens = rng.uniform(0, 1, (U, B))                       # not monotone in the bit-width either
    bits = tuple(range(2, 2 + B))
    front = pareto_front(cost, sens, bits, const=1.5)
    plans = list(itertools.product(range(B), repeat=U))
    total = lambda a, ch: sum(a[k, j] for k, j in enumerate(ch))
    assert np.all(np.diff(front.cost) > 0) and np.all(np.diff(front.sens) < 0)
    for budget in np.linspace(1.5 + cost[:, 0].sum(), 1.5 + cost[:, -1].sum() + 1, 9):
        best = min(total(sens, ch) for ch in plans if 1.5 + total(cost, ch) <= budget + 1e-9)
        plan, c, s = front.best(budget)
        ch = [bits.index(b) for b in plan]
        assert s == pytest.approx(best) and total(sens, ch) == pytest.approx(s) and 1.5 + total(cost, ch) == pytest.approx(c) and c <= budget + 1e-9
    with pytest.raises(ValueError, match='below the cheapest plan'): front.best(1.5 + cost[:, 0].sum() - 0.1)

def test_plan_kl_is_the_whole_plans_kl_and_agrees_with_the_sensitivity(r8):
    x = torch.randn(24, 3, 32, 32)
    set_bits(r8, PLAN)
    s = sensitivity(r8, x, batch_size=10)
    one = BitPlan((8, 8, 8, 4, 8, 8, 8))                                    # one slot lowered: the sensitivity's own measurement
    kl = plan_kl(r8, [BitPlan.uniform(r8, 8), one, BitPlan.uniform(r8, 4), BitPlan.uniform(r8, 6), PLAN], x, batch_size=7)
    assert current_plan(r8) == PLAN                                         # the model is left as it was
    assert kl[0] == pytest.approx(0, abs=1e-7) and kl[1] == pytest.approx(s.kl[3, 0], rel=1e-4)
    assert kl[2] == pytest.approx(s.uniform[0], rel=1e-4) and kl[3] == pytest.approx(s.uniform[1], rel=1e-4)
    with torch.no_grad():                                                   # against another reference, by hand
        ref = torch.log_softmax(set_bits(r8, 6)(x), -1); low = torch.log_softmax(set_bits(r8, PLAN)(x), -1)
    assert plan_kl(r8, [PLAN], x, reference=6)[0] == pytest.approx(float((ref.exp() * (ref - low)).sum(-1).mean()), rel=1e-4)
    with pytest.raises(ValueError, match='2..8|one bit-width per'): plan_kl(r8, [[4, 8]], x)
    set_bits(r8, PLAN)

@pytest.mark.parametrize('seed', range(6))
def test_measured_picks(seed):
    rng = np.random.default_rng(seed)
    cost = rng.uniform(0.5, 3, (6, 3)).cumsum(1); sens = rng.uniform(0, 1, (6, 3))[:, ::-1].cumsum(1)[:, ::-1]
    front = pareto_front(cost, sens, (4, 6, 8))
    whole = rng.uniform(0, 1, len(front.cost))                              # a "measured" KL per front point, unrelated to the sum
    calls = []
    def measure(idx): calls.extend(idx); return whole[idx]
    budgets = list(np.linspace(front.cost[0], front.cost[-1], 7)[::-1])     # any order
    K = 3
    picks = measured_picks(front, budgets, measure, candidates=K)
    assert len(calls) == len(set(calls))                                    # each point measured once
    by_budget = dict(zip(budgets, picks))
    lower = []
    for b in sorted(budgets):
        i, kl = by_budget[b]
        last = front.index(b)
        pool = list(range(max(0, last - K + 1), last + 1)) + lower
        assert front.cost[i] <= b * (1 + 1e-12) and kl == whole[i] and kl == min(whole[pool])
        lower.append(i)
    kls = [by_budget[b][1] for b in sorted(budgets)]
    assert all(a >= c for a, c in zip(kls, kls[1:]))                       # the budgets only grow: so does the choice
    big = measured_picks(front, budgets, lambda idx: whole[idx], candidates=len(front.cost))   # every point: the true least
    assert all(kl == whole[:front.index(b) + 1].min() for b, (_, kl) in zip(budgets, big))
    with pytest.raises(ValueError, match='candidates must be a positive integer'): measured_picks(front, budgets, measure, candidates=0)
    with pytest.raises(ValueError, match='below the cheapest plan'): measured_picks(front, [front.cost[0] - 0.1], measure)

def test_mixed_precision_measured_selection(r8):
    x = torch.randn(32, 3, 32, 32)
    agree = lambda m: 100.0
    set_bits(r8, 6)
    out = mixed_precision(r8, x, agree, [5.0, 7.0, 4.5], n_random=1, select='measured', candidates=5)
    assert current_plan(r8) == BitPlan.uniform(r8, 6) and out['select'] == 'measured' and out['seconds']['select'] >= 0
    front = [r for r in out['rows'] if r['method'] == 'ptmq_mp']
    assert [r['budget'] for r in front] == [5.0, 7.0, 4.5] and all(r['avg_a_bits'] <= r['budget'] + 1e-9 for r in front)
    for r in front:                                                         # the row's measured KL is its plan's, and the least of its pool
        plan = BitPlan(tuple(r['plan']))
        assert r['measured_kl'] == pytest.approx(plan_kl(r8, [plan], x)[0], abs=1e-6)   # rows round to 6 places
        assert r['measured_kl'] <= plan_kl(r8, [out['front'].best(r['budget'])[0]], x)[0] + 1e-6
    assert front[1]['measured_kl'] <= front[0]['measured_kl'] <= front[2]['measured_kl'] + 1e-9
    assert not any('measured_kl' in r for r in mixed_precision(r8, x, agree, [5.0], n_random=0, uniform=False, select='sum')['rows'])
    with pytest.raises(ValueError, match='unknown plan selection'): mixed_precision(r8, x, agree, [5.0], select='best')
    with pytest.raises(ValueError, match='candidates must be'): mixed_precision(r8, x, agree, [5.0], select='measured', candidates=True)

def test_random_plans_fit_and_fill_the_budget():
    rng = np.random.default_rng(0)
    cost = np.array([[1., 2, 4], [2, 3, 5], [1, 1.5, 2], [3, 4, 6]])
    for budget in (7, 9.5, 12, 17):
        for _ in range(20):
            p = random_plan(cost, (4, 6, 8), budget, rng)
            ch = [(4, 6, 8).index(b) for b in p]
            c = cost[np.arange(4), ch].sum()
            assert c <= budget
            assert all(c - cost[k, ch[k]] + cost[k, j] > budget for k in range(4) for j in range(ch[k] + 1, 3))   # no raise still fits
    with pytest.raises(ValueError, match='below the cheapest'): random_plan(cost, (4, 6, 8), 6.9, rng)

def test_budget_grid():
    assert budget_grid((4, 6, 8), 3) == [5.0, 6.0, 7.0]
    assert len(budget_grid((6, 7, 8), 8)) == 8 and all(6 < b < 8 for b in budget_grid((6, 7, 8), 8))

def test_mixed_precision_study_rows(r8):
    x = torch.randn(32, 3, 32, 32)
    with torch.no_grad(): ref = set_bits(r8, 8)(x).argmax(1)
    def agree(m):
        with torch.no_grad(): return float((m(x).argmax(1) == ref).float().mean() * 100)
    set_bits(r8, 6)
    out = mixed_precision(r8, x, agree, [5.0, 7.0], n_random=3)
    rows = out['rows']
    assert [r['method'] for r in rows] == ['ptmq'] * 3 + (['ptmq_mp'] + ['random_mp'] * 3) * 2
    assert current_plan(r8) == BitPlan.uniform(r8, 6)                       # left as it was
    for r in rows:
        assert set(r) >= {'method', 'w_bits', 'a_bits', 'avg_a_bits', 'bops', 'top1', 'plan'} and len(r['plan']) == 7
        if r['method'] != 'ptmq': assert r['a_bits'] is None and r['avg_a_bits'] <= r['budget'] + 1e-9
    assert rows[2]['top1'] == 100.0 and rows[2]['a_bits'] == 8
    assert set(out['plans']) == {'avg_bits_5', 'avg_bits_7'}
    with pytest.raises(ValueError, match=r'below the cheapest plan'): mixed_precision(r8, x, agree, [3.5])
    with pytest.raises(ValueError, match='unknown budget kind'): mixed_precision(r8, x, agree, [5.0], kind='latency')
    sc = mixed_precision(r8, x, agree, [5.0], n_random=0, uniform=False, scaled=True, select='sum')
    assert np.allclose(sc['sensitivity'].kl, out['sensitivity'].kl)       # the study keeps the measured sensitivities
    plan = BitPlan(tuple(sc['rows'][0]['plan']))                           # the knapsack saw the scaled ones
    assert sc['rows'][0]['predicted_kl'] == pytest.approx(sc['sensitivity'].scaled().total(plan), abs=1e-6)
    assert sc['front'].best(5.0)[0] == plan and sc['scaled'] and not out['scaled']
    assert sc['front'].best(5.0)[2] == pytest.approx(sc['sensitivity'].scaled().total(plan))
    assert sc['sensitivity'].scaled().total(plan) != pytest.approx(sc['sensitivity'].total(plan))
    bops = mixed_precision(r8, x, agree, [0.8], kind='bops', n_random=1)
    full = bops['costs'].bops(BitPlan.uniform(r8, 8))
    assert all(r['bops'] <= 0.8 * full * (1 + 1e-9) for r in bops['rows'] if r['method'] != 'ptmq')

def test_line_se_by_hand():
    lo, hi, plan = (np.array(v, dtype=bool) for v in ([1, 0, 1, 1], [1, 1, 0, 1], [1, 1, 1, 0]))
    # halfway: the line per image is 1, .5, .5, 1; the differences 0, .5, .5, -1 (mean 0, sample variance 0.5)
    assert line_se(5.0, [(6.0, hi), (4.0, lo)], plan) == pytest.approx(100 * np.sqrt(0.5) / 2)
    assert line_se(3.0, [(4.0, lo), (6.0, hi)], plan) == pytest.approx(100 * np.std(plan.astype(float) - lo, ddof=1) / 2)   # clamped, as np.interp
    assert line_se(5.0, [(4.0, lo), (6.0, lo)], lo) == 0.0                 # a plan that gets the line's images right
    with pytest.raises(ValueError, match='at least two'): line_se(5.0, [(4.0, lo)], plan)
    with pytest.raises(ValueError, match='different lengths'): line_se(5.0, [(4.0, lo), (6.0, hi[:3])], plan)

def test_mixed_precision_paired_standard_errors(r8):
    x = torch.randn(64, 3, 32, 32)
    with torch.no_grad(): ref = set_bits(r8, 8)(x).argmax(1)
    def hits(m):
        with torch.no_grad(): return (m(x).argmax(1) == ref).numpy()
    before = current_plan(r8)
    out = mixed_precision(r8, x[:16], hits, [4.5, 5.0, 7.0], n_random=1)
    rows = out['rows']
    top1 = mixed_precision(r8, x[:16], lambda m: float(hits(m).mean() * 100), [4.5, 5.0, 7.0], n_random=1)['rows']
    assert [r['top1'] for r in rows] == pytest.approx([r['top1'] for r in top1])         # the same top-1 either way
    assert all('line_se' not in r for r in top1)                            # no per-image correctness, no error bars
    uni = {b: hits(set_bits(r8, b)) for b in (4, 6, 8)}
    costs = out['costs']
    for r in (r for r in rows if r['method'] == 'ptmq_mp'):
        assert set(r['line_se']) == {'avg_a_bits', 'bops'} and all(v >= 0 for v in r['line_se'].values())
        h = hits(set_plan(r8, r['plan']))
        pts = {k: [(f(BitPlan.uniform(r8, b)), uni[b]) for b in (4, 6, 8)] for k, f in (('avg_a_bits', costs.avg_bits), ('bops', costs.bops))}
        assert r['line_se'] == {k: pytest.approx(line_se(r[k], p, h), abs=1e-4) for k, p in pts.items()}
    for r in (r for r in rows if r['method'] != 'ptmq_mp'): assert 'line_se' not in r
    t = front_table(rows)                                                   # the table's line is the mean of the paired differences
    assert list(t['paired s.e.']) == [r['line_se']['avg_a_bits'] for r in rows if r['method'] == 'ptmq_mp']
    assert front_table(top1)['paired s.e.'].isna().all()
    import pandas as pd
    t = pd.DataFrame({'front - line': [0.1, -0.05, -0.3], 'paired s.e.': [0.2, 0.1, 0.1], 'front - random': [0.2, 0.1, -0.1]})
    assert front_summary(t) == ("The front is on or above the uniform line at 1 of 3 budgets; the 2 below are 0.05-0.30 points below, "
                                "0.5-3.0 paired standard errors (1 beyond 2); above the random plans' mean at 2 of 3.")
    assert front_summary(t.assign(**{'paired s.e.': float('nan')}).iloc[:2]) == \
        "The front is on or above the uniform line at 1 of 2 budgets; the one below is 0.05 points below; above the random plans' mean at 2 of 2."
    assert front_summary(t.iloc[:2]) == ("The front is on or above the uniform line at 1 of 2 budgets; the one below is 0.05 points below, "
                                         "0.5 paired standard errors (within 2: the test set cannot tell it from the line); above the random plans' mean at 2 of 2.")
    given = mixed_precision(r8, x[:16], hits, [4.5, 5.0, 7.0], n_random=1, uniform=False, uniform_correct=uni)['rows']
    assert [r.get('line_se') for r in given] == [r.get('line_se') for r in rows if r['method'] != 'ptmq']
    with pytest.raises(ValueError, match=r'every uniform plan \['): mixed_precision(r8, x[:16], hits, [5.0], uniform=False, uniform_correct={4: uni[4], 8: uni[8]})
    set_plan(r8, before)

def test_saved_model_carries_plans_and_sensitivity(r8, tmp_path):
    r8.plans = {'edge': BitPlan((4, 4, 6, 8, 4, 4, 4)), 'server': BitPlan((8, 8, 6, 6, 8, 8, 8))}
    r8.sensitivity = sensitivity(r8, torch.randn(8, 3, 32, 32))
    try:
        ptmq.save(r8, tmp_path / 'm.safetensors', data_config={'input_size': [3, 32, 32]})
    finally:
        del r8.plans, r8.sensitivity
    meta = ptmq.read_metadata(tmp_path / 'm.safetensors')
    assert meta['plans'] == {'edge': [4, 4, 6, 8, 4, 4, 4], 'server': [8, 8, 6, 6, 8, 8, 8]}
    back = ptmq.load(tmp_path / 'm.safetensors')
    assert back.plans['edge'] == BitPlan((4, 4, 6, 8, 4, 4, 4)) and back.sensitivity.kl.shape == (7, 3)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for p in back.plans.values(): assert torch.equal(set_bits(back, p)(x), set_bits(r8, p)(x))
    r8.plans = {'bad': [4, 4]}
    try:
        with pytest.raises(ValueError, match='one bit-width per switchable activation quantizer'): ptmq.save(r8, tmp_path / 'bad.safetensors')
    finally: del r8.plans
    assert not (tmp_path / 'bad.safetensors').exists()

def test_export_of_a_plan(r8, tmp_path):
    from ptmq.export import export_module, export_command
    plan = PLAN
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(): assert torch.equal(export_module(r8, plan)(x), set_bits(r8, plan)(x))
    r8.plans = {'mixed 5': plan}
    try: ptmq.save(r8, tmp_path / 'm.safetensors', data_config={'input_size': [3, 32, 32]})
    finally: del r8.plans
    res = export_command(tmp_path / 'm.safetensors', plan='mixed 5')
    assert res['onnx'].endswith('m_mixed_5.onnx')
    import onnx
    meta = {p.key: p.value for p in onnx.load(res['onnx']).metadata_props}
    assert meta['ptmq.a_bits'] == 'plan 4-8-6-4-6-8-4'
    with pytest.raises(ValueError, match=r"has no plan 'fast'; its plans: mixed 5"): export_command(tmp_path / 'm.safetensors', plan='fast')
    with pytest.raises(ValueError, match='exactly one of --bits B and --plan NAME'): export_command(tmp_path / 'm.safetensors', 4, plan='mixed 5')

def _raw(**kw):
    return {'name': 'x', 'model': 'digits_resnet8', 'calib_data': 'builtin:digits/train', 'eval_data': 'builtin:digits/test',
            'ptmq': {'w_bits': 3, 'groups': {'low': [2], 'mid': [3], 'high': [4]}, 'iters': 10}, **kw}

@pytest.mark.parametrize('section, msg', [
    ({'budget': 'latency'}, 'budget must be avg_bits or bops'),
    ({'budgets': [2.5, 5.0]}, r'between the lowest and highest bit-width 2\.\.4'),
    ({'budgets': 0}, 'positive integer'),
    ({'budgets': True}, 'positive integer'),
    ({'budgets': [0.5, 1.5], 'budget': 'bops'}, r'fractions .* in \(0, 1\]'),
    ({'random_plans': -1}, 'random_plans must be a non-negative integer'),
    ({'sensitivity_images': 0}, 'sensitivity_images must be a positive integer'),
    ({'sensitivity_from': 'test'}, 'sensitivity_from must be held_out or calibration'),
    ({'select': 'best'}, 'select must be measured or sum'),
    ({'candidates': 0}, 'candidates must be a positive integer'),
    ({'candidates': 2.5}, 'candidates must be a positive integer'),
    ({'budgetz': [3]}, r"unknown key\(s\) \['budgetz'\]"),
    ('yes', 'must be a mapping')])
def test_mixed_precision_params_errors(section, msg):
    from ptmq.experiment import params_from_dict, ParamsError
    with pytest.raises(ParamsError, match="key 'mixed_precision': .*" + msg):
        params_from_dict(_raw(mixed_precision=section), check_paths=False)

def test_mixed_precision_params():
    from ptmq.experiment import params_from_dict, ParamsError
    p = params_from_dict(_raw(mixed_precision={'budgets': 3}), check_paths=False)
    assert p.mixed_precision.budget_list((2, 3, 4)) == [2.5, 3.0, 3.5] and p.to_dict()['mixed_precision']['budgets'] == 3
    mp = params_from_dict(_raw(mixed_precision=True), check_paths=False).mixed_precision
    assert mp.budgets == 8 and mp.select == 'measured' and mp.candidates == 40
    assert params_from_dict(_raw(mixed_precision={'select': 'sum', 'candidates': 5}), check_paths=False).to_dict()['mixed_precision'].items() >= {'select': 'sum', 'candidates': 5}.items()
    assert params_from_dict(_raw(), check_paths=False).mixed_precision is None
    with pytest.raises(ParamsError, match='at least two activation bit-widths'):
        params_from_dict(_raw(mixed_precision={}, ptmq={'w_bits': 3, 'single_bits': 3}), check_paths=False)
    with pytest.raises(ParamsError, match=r"key 'mixed_precision': sensitivity_images 300 with sensitivity_from: calibration needs as "
                                          r"many calibration images, but calib_images is 256; lower sensitivity_images or use held_out"):
        params_from_dict(_raw(calib_images=256, mixed_precision={'sensitivity_images': 300, 'sensitivity_from': 'calibration'}), check_paths=False)
    assert params_from_dict(_raw(calib_images=256, mixed_precision={'sensitivity_images': 256, 'sensitivity_from': 'calibration'}), check_paths=False)

def test_held_out_sensitivity_images(digits_seed):
    "The default sensitivity images are training images outside the calibration set; too few of them is a clear error before any work."
    from ptmq.experiment import params_from_dict, ParamsError, prepare
    p = params_from_dict(_raw(calib_images=1024, mixed_precision={'sensitivity_images': 64}))
    prep = prepare(p)
    held = prep.sensitivity_images(p.mixed_precision)
    assert held.shape == (64, 3, 8, 8) and not any(torch.equal(h, c) for h in held for c in prep.calib)
    assert len({h.numpy().tobytes() for h in held}) == 64
    p.mixed_precision.sensitivity_from = 'calibration'
    assert torch.equal(prep.sensitivity_images(p.mixed_precision), prep.calib[:64])
    msg = (r"key 'mixed_precision': 500 held-out sensitivity images beside the 1024 calibration images need 1524 in "
           r"builtin:digits/train, which has 1437; lower sensitivity_images or calib_images, or set sensitivity_from: calibration")
    with pytest.raises(ParamsError, match=r'<params>: ' + msg):                  # when the parameters are read
        params_from_dict(_raw(calib_images=1024, mixed_precision={'sensitivity_images': 500}))
    with pytest.raises(ParamsError, match=r'x: ' + msg):                         # and by prepare, when they were not checked
        prepare(params_from_dict(_raw(calib_images=1024, mixed_precision={'sensitivity_images': 500}), check_paths=False))
    assert params_from_dict(_raw(calib_images=1024, mixed_precision={'sensitivity_images': 500, 'sensitivity_from': 'calibration'}))

def test_model_file_is_checked_before_any_work(r8, tmp_path):
    from ptmq.experiment import params_from_dict, ParamsError, load_kept
    with pytest.raises(ParamsError, match="key 'model_file': .*not found"):
        params_from_dict(_raw(model_file=str(tmp_path / 'none.safetensors')), check_paths=False).check_model_file()
    ptmq.save(r8, tmp_path / 'r8.safetensors', model_name='cifar_resnet8')
    p = params_from_dict(_raw(model_file=str(tmp_path / 'r8.safetensors')), check_paths=False)
    with pytest.raises(ParamsError, match=r"holds \{'model': 'cifar_resnet8', 'w_bits': 4, 'a_bits': \[4, 6, 8\]\}, but this experiment is \{'model': 'digits_resnet8'"):
        p.check_model_file()

def test_held_out_images_of_a_kept_model_are_held_out_from_its_calibration(r8, tmp_path):
    "A run from a kept model takes held-out images only when the file records the same calibration images as the run's."
    from ptmq.experiment import params_from_dict, ParamsError
    raw = _raw(model_file=str(tmp_path / 'r8.safetensors'), ptmq=r8.config.to_dict(), mixed_precision={'sensitivity_images': 64})
    p = params_from_dict(raw, check_paths=False)
    ptmq.save(r8, tmp_path / 'r8.safetensors', model_name='digits_resnet8', metadata={'experiment': 'x', **p.calibration_record()})
    assert p.check_model_file()['user']['calib_seed'] == 0
    for change in ({'calib_seed': 1}, {'calib_images': 512}):
        q = params_from_dict({**raw, **change}, check_paths=False)
        with pytest.raises(ParamsError, match=r"held-out sensitivity images must be images .*r8.safetensors was not calibrated on"):
            q.check_model_file()
        params_from_dict({**raw, **change, 'mixed_precision': {'sensitivity_from': 'calibration'}}, check_paths=False).check_model_file()
    ptmq.save(r8, tmp_path / 'r8.safetensors', model_name='digits_resnet8')   # a file that does not say: refused too
    with pytest.raises(ParamsError, match=r"its calibration images \{'calib_data': None"): p.check_model_file()
