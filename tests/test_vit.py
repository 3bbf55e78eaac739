import pytest
import torch
from torch import nn
from timm.models.vision_transformer import VisionTransformer
from conftest import need_shared
from ptmq.blocks import quant_state, set_bits, freeze_bits, act_quantizers
from ptmq.arch import quantize_model
from ptmq.vit import QuantViTBlock
from ptmq.recon import PTMQConfig, ptmq, round_to_nearest
from ptmq.models import create_model, WeightsError
from ptmq.loss import lp_distance

def small_vit(**kw):
    torch.manual_seed(0)
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=2, mlp_ratio=2.0, num_classes=10, **kw).eval()

@pytest.mark.parametrize('kw', [{}, {'global_pool': 'avg', 'class_token': True}, {'no_embed_class': True}])
def test_vit_wrapping_exact_when_off_and_close_at_8_bits(kw):
    vit, x = small_vit(**kw), torch.randn(4, 3, 32, 32)
    qm = quantize_model(vit, 8, (6, 8), observer='minmax')
    assert sum(isinstance(u, QuantViTBlock) for u in qm.units) == 2
    with torch.no_grad():
        ref = vit(x)
        with quant_state(qm, weights=False, acts=False): assert torch.allclose(qm(x), ref, atol=1e-5)
    rtn = round_to_nearest(vit, torch.randn(32, 3, 32, 32), PTMQConfig(w_bits=8, groups={'low': [6], 'mid': [7], 'high': [8]}, observe_images=32))
    with torch.no_grad(): out = set_bits(rtn, 8)(x)
    assert nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0) > 0.99

def test_vit_attention_matmul_quantizers_by_config():
    on = quantize_model(small_vit(), 4, (6, 8))
    off = quantize_model(small_vit(), 4, (6, 8), quant_attn_matmul=False)
    per_block_on = len(act_quantizers(on.units[1])); per_block_off = len(act_quantizers(off.units[1]))
    assert per_block_on == 8 and per_block_off == 4     # qkv, proj, fc1, fc2 inputs (+ q, k, v, softmax output)

def test_vit_switching_invariants():
    vit = small_vit()
    qm = ptmq(vit, torch.randn(32, 3, 32, 32), PTMQConfig(w_bits=4, iters=2, batch_size=4, observe_images=16,
                                                         groups={'low': [6], 'mid': [7], 'high': [8]}), progress=False)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        a = set_bits(qm, 6)(x); set_bits(qm, 8); b = set_bits(qm, 6)(x)
        assert torch.equal(a, b) and torch.equal(a, freeze_bits(qm, 6)(x))
        assert not torch.equal(a, set_bits(qm, 8)(x))

def test_token_distance_sums_features():
    assert lp_distance(torch.zeros(2, 5, 3), torch.ones(2, 5, 3)).item() == 3.0

def test_cifar_vit_checkpoint_errors(tmp_path):
    with pytest.raises(WeightsError, match='no published download'): create_model('cifar10_vit_p4_d192x6')
    bad = tmp_path / 'v.pth'; torch.save({'state_dict': {}}, bad)
    with pytest.raises(WeightsError, match="no 'config'"): create_model('cifar10_vit_p4_d192x6', weights=bad)

def test_cifar_vit_checkpoint_loads_with_its_accuracy():
    w = need_shared('weights', 'cifar10', 'vit_cifar10_p4_d192x6.pth')
    test = need_shared('data', 'cifar10', 'test')
    from ptmq.data import model_transform, image_folder, evaluate, seeded_subset
    vit = create_model('cifar10_vit_p4_d192x6', weights=w)
    assert sum(p.numel() for p in vit.parameters()) == pytest.approx(1.81e6, rel=0.01)
    ds = seeded_subset(image_folder(test, model_transform('cifar10_vit_p4_d192x6')), 1000, seed=0)
    assert evaluate(vit, ds) > 60.0    # 66.58 % on the full test set (../shared/README.md)

def test_quantization_leaves_the_float_model_untouched():
    vit = small_vit()
    before = {k: v.clone() for k, v in vit.state_dict().items()}
    qm = ptmq(vit, torch.randn(16, 3, 32, 32), PTMQConfig(iters=1, batch_size=4, observe_images=8,
                                                         groups={'low': [6], 'mid': [7], 'high': [8]}), progress=False)
    assert all(p.requires_grad for p in vit.parameters())
    assert qm.units[1].norm1 is not vit.blocks[0].norm1
    assert all(torch.equal(before[k], v) for k, v in vit.state_dict().items())
