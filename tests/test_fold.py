import pytest
import torch
from torch import nn
from ptmq.fold import fold_bn

@pytest.mark.parametrize('cin,cout,k,stride,groups,bias', [(3, 8, 3, 1, 1, False), (16, 32, 1, 2, 1, True), (12, 12, 3, 2, 12, False), (8, 16, 3, 1, 2, True)])
def test_fold_bn_exact(cin, cout, k, stride, groups, bias):
    g = torch.Generator().manual_seed(cin * cout)
    conv, bn = nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=bias), nn.BatchNorm2d(cout)
    with torch.no_grad():
        bn.weight.copy_(torch.randn(cout, generator=g)); bn.bias.copy_(torch.randn(cout, generator=g))
        bn.running_mean.copy_(torch.randn(cout, generator=g)); bn.running_var.copy_(torch.rand(cout, generator=g) + 0.1)
    conv.eval(); bn.eval()
    before = conv.weight.clone()
    folded = fold_bn(conv, bn)
    x = torch.randn(4, cin, 12, 12, generator=g)
    with torch.no_grad():
        assert (bn(conv(x)) - folded(x)).abs().max() < 1e-5
        # the equations: W' = W g / sigma, b' = beta + (b - mu) g / sigma
        sigma = torch.sqrt(bn.running_var + bn.eps)
        assert torch.allclose(folded.weight, conv.weight * (bn.weight / sigma).view(-1, 1, 1, 1), atol=1e-6)
        b = conv.bias if bias else torch.zeros(cout)
        assert torch.allclose(folded.bias, bn.bias + (b - bn.running_mean) * bn.weight / sigma, atol=1e-6)
    assert torch.equal(conv.weight, before)          # inputs untouched

def test_fold_bn_errors():
    with pytest.raises(ValueError, match='features'): fold_bn(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(4))
    with pytest.raises(TypeError, match='BatchNorm2d'): fold_bn(nn.Conv2d(3, 8, 3), nn.LayerNorm(8))
    c = nn.Conv2d(3, 8, 3)
    assert torch.equal(fold_bn(c, None).weight, c.weight)
