"""Keeping and deploying a model: code packing, bit-exact save/load round trips for every architecture family, every bad-file
error, the architecture registry with a model of one's own, and the ONNX export (QDQ graph, onnxruntime against PyTorch)."""
import json, math
import numpy as np
import pytest
import torch
from torch import nn
import torchvision
from torchvision.models.resnet import ResNet, Bottleneck
from timm.models.vision_transformer import VisionTransformer
import ptmq
from ptmq.serialize import pack_codes, unpack_codes, save, load, read_metadata, ModelFileError, FORMAT_VERSION
from ptmq.arch import Architectures, Architecture, quantize_model, check_rebuild, config_args, ARCHITECTURES
from ptmq.blocks import set_bits, set_weight_mode, act_quantizers, weight_quantizers, QuantResidualBlock
from ptmq.models import CifarResNet, create_model
from ptmq.export import export_module, export_onnx, check_onnx, export_command, _session

# ---------------------------------------------------------------- packing

def test_pack_codes_by_hand():
    assert pack_codes(torch.tensor([1, 2, 3, 15, 0]), 4).tolist() == [0x21, 0xF3, 0x00]     # low nibble first
    assert pack_codes(torch.tensor([1, 2, 3]), 3).tolist() == [0b11010001, 0b0]               # 1 | 2<<3 | (3 & 3)<<6, then 3>>2
    assert pack_codes(torch.tensor([3, 0, 1, 2, 1]), 2).tolist() == [0b10010011, 0b01]
    assert pack_codes(torch.tensor([200, 7]), 8).tolist() == [200, 7]

@pytest.mark.parametrize('bits', range(1, 9))
def test_pack_unpack_round_trip_and_size(bits):
    g = torch.Generator().manual_seed(bits)
    for n in (0, 1, 7, 8, 1001, (1 << 20) + 13):       # across the chunk boundary of the packer too
        codes = torch.randint(0, 2 ** bits, (n,), generator=g, dtype=torch.uint8)
        packed = pack_codes(codes, bits)
        assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(n * bits / 8)
        assert torch.equal(unpack_codes(packed, bits, n), codes)

def test_pack_errors():
    with pytest.raises(ValueError, match='codes must lie in 0..15'): pack_codes(torch.tensor([16]), 4)
    with pytest.raises(ValueError, match='bits must be an integer in 1..8'): pack_codes(torch.tensor([1]), 9)
    with pytest.raises(ValueError, match='10 codes of 4 bits take 5 bytes; got 4'): unpack_codes(torch.zeros(4, dtype=torch.uint8), 4, 10)

# ---------------------------------------------------------------- round trips

def small_vit(**kw):
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=2, mlp_ratio=2.0, num_classes=10, **kw)

class TinyCNN(nn.Module):
    def __init__(self, width: int = 8, num_classes: int = 10):
        super().__init__()
        self.conv0, self.bn0 = nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)
        self.conv1, self.bn1 = nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)
        self.fc = nn.Linear(width, num_classes)
    def forward(self, x):
        x = torch.relu(self.bn0(self.conv0(x)))
        return self.fc(torch.relu(x + self.bn1(self.conv1(x))).mean((2, 3)))

def tiny_registry(config=lambda m: {'width': m.conv0.out_channels, 'num_classes': m.fc.out_features}) -> Architectures:
    "A registry of its own with the built-ins and TinyCNN (the package's registry is left alone)."
    reg = Architectures(list(ARCHITECTURES))
    reg.register(Architecture('tiny_cnn', TinyCNN,
                              lambda m, s: [s.layer(m.conv0, m.bn0, nn.ReLU(), out_q=True, w_bits=s.first_last_w_bits),
                                            QuantResidualBlock([s.layer(m.conv1, m.bn1)], None, s.aq(), nn.ReLU()), s.head(m.fc)],
                              config, lambda c: TinyCNN(**config_args(c, width=int, num_classes=int))))
    return reg

FAMILIES = {
    'cifar_resnet20': (lambda: CifarResNet(20), None),
    'digits_resnet8': (lambda: CifarResNet(8), None),
    'torchvision_resnet18': (lambda: torchvision.models.resnet18(num_classes=10), None),
    'torchvision_bottleneck': (lambda: ResNet(Bottleneck, [1, 1, 1, 1], num_classes=10), None),
    'mobilenet_v2': (lambda: torchvision.models.mobilenet_v2(num_classes=10), None),
    'timm_regnetx_006': (lambda: create_model('regnetx_006', pretrained=False), None),
    'timm_vit_token': (lambda: small_vit(), None),
    'timm_vit_avg_no_embed_class': (lambda: small_vit(global_pool='avg', no_embed_class=True, init_values=0.1), None),
    'custom_cnn': (lambda: TinyCNN(), tiny_registry),
}

def calibrated_like(qm, seed=0):
    "Give every learned quantity a random, calibrated-looking value: rounding directions (then hard), steps and zero points per bit-width."
    g = torch.Generator().manual_seed(seed)
    for q in weight_quantizers(qm):
        q.alpha.data = torch.randn(q.alpha.shape, generator=g)
    set_weight_mode(qm, 'hard')
    for q in act_quantizers(qm):
        q.scale.data = torch.rand(q.scale.shape, generator=g) * 0.05 + 0.01
        q.zero_point.copy_(torch.floor(torch.rand(q.zero_point.shape, generator=g) * (q.qmax + 1)).clamp(max=q.qmax))
    return qm

def outputs(qm, x):
    with torch.no_grad(): return {b: set_bits(qm, b)(x) for b in qm.a_bits}

@pytest.mark.parametrize('family', list(FAMILIES))
def test_save_load_round_trip_is_bit_exact_at_every_bit_width(family, tmp_path):
    build, registry = FAMILIES[family]
    reg = registry() if registry else None
    torch.manual_seed(0)
    qm = calibrated_like(quantize_model(build().eval(), 4, (3, 4, 6, 8), observer='minmax', registry=reg))
    x = torch.randn(2, 3, 32, 32)
    before = outputs(qm, x)
    info = save(qm, tmp_path / 'm.safetensors', model_name=family, registry=reg)
    assert info['bytes'] == (tmp_path / 'm.safetensors').stat().st_size and len(info['sha256']) == 64
    back = load(tmp_path / 'm.safetensors', registry=reg)
    after = outputs(back, x)
    for b in qm.a_bits: assert torch.equal(before[b], after[b]), f"A{b} differs after load"
    assert back.a_bits == qm.a_bits and back.w_bits == qm.w_bits and back.arch == qm.arch
    assert all(q.mode == 'codes' and not hasattr(q, 'alpha') for q in weight_quantizers(back))
    meta = back.metadata
    assert meta['model'] == family and meta['spec']['a_bits'] == [3, 4, 6, 8] and meta['format_version'] == 2 <= FORMAT_VERSION   # no shifts per bit-width: a format-2 file
    resaved = save(back, tmp_path / 'again.safetensors', registry=reg)   # a loaded model saves to the same tensors
    assert read_metadata(tmp_path / 'again.safetensors')['tensor_sha256'] == meta['tensor_sha256'] and resaved['bytes'] == info['bytes']

def test_round_to_nearest_model_round_trip_and_switching_after_load(tmp_path):
    from ptmq.recon import PTMQConfig, round_to_nearest
    torch.manual_seed(0)
    rtn = round_to_nearest(CifarResNet(20).eval(), torch.randn(32, 3, 32, 32), PTMQConfig(w_bits=3, observe_images=16, groups={'low': [2], 'mid': [4], 'high': [8]}))
    assert {q.mode for q in weight_quantizers(rtn)} == {'nearest'}
    x = torch.randn(3, 3, 32, 32)
    before = outputs(rtn, x)
    save(rtn, tmp_path / 'rtn.safetensors')
    back = load(tmp_path / 'rtn.safetensors')
    assert back.metadata['config']['w_bits'] == 3 and back.metadata['calibration']['iters_per_block'] == 0
    ptrs = [q.scale.data_ptr() for q in act_quantizers(back)]
    with torch.no_grad():
        a = set_bits(back, 2)(x); set_bits(back, 8); again = set_bits(back, 2)(x)
    assert torch.equal(a, before[2]) and torch.equal(again, a)
    assert [q.scale.data_ptr() for q in act_quantizers(back)] == ptrs     # switching moved or recomputed nothing
    with pytest.raises(ValueError, match='holds integer codes only'): set_weight_mode(back, 'soft')

def test_the_file_holds_packed_codes_not_float_weights(tmp_path):
    from safetensors import safe_open
    qm = calibrated_like(quantize_model(CifarResNet(20).eval(), 4, (4, 8), observer='minmax'))
    save(qm, tmp_path / 'm.safetensors')
    with safe_open(str(tmp_path / 'm.safetensors'), 'pt') as f:
        keys = set(f.keys())
        codes = f.get_tensor('units.1.body.0.wq.int_codes')
    assert not any(k.endswith(('.alpha', '.layer.weight')) for k in keys)
    l = qm.units[1].body[0]
    assert codes.dtype == torch.uint8 and codes.numel() == l.layer.weight.numel() // 2        # two 4-bit codes per byte
    assert torch.equal(unpack_codes(codes, 4, l.layer.weight.numel()).reshape(l.layer.weight.shape), l.wq.codes(l.layer.weight))
    assert {'units.1.out_q.scale', 'units.1.out_q.zero_point', 'units.1.body.0.layer.bias', 'units.1.body.0.wq.scales'} <= keys

# ---------------------------------------------------------------- errors

@pytest.fixture
def saved(tmp_path):
    qm = calibrated_like(quantize_model(CifarResNet(8).eval(), 4, (4, 8), observer='minmax'))
    save(qm, tmp_path / 'good.safetensors')
    return tmp_path, (tmp_path / 'good.safetensors').read_bytes()

def _rewrite(path, src, change):
    "Write `src`'s tensors to `path` with its metadata changed by `change(raw_metadata)`."
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open
    with safe_open(str(src), 'pt') as f: raw = dict(f.metadata())
    change(raw)
    save_file(load_file(str(src)), str(path), metadata=raw)
    return path

def test_bad_files_are_refused_naming_the_file(saved):
    tmp, good = saved
    src = tmp / 'good.safetensors'
    cases = {}
    cases['missing'] = (tmp / 'missing.safetensors', r'model file not found: .*missing\.safetensors')
    (tmp / 'truncated.safetensors').write_bytes(good[:len(good) // 2])
    cases['truncated'] = (tmp / 'truncated.safetensors', r'truncated\.safetensors: cannot read it as a safetensors file \(truncated or corrupted\?\)')
    flipped = bytearray(good); flipped[-3] ^= 0x55; (tmp / 'flipped.safetensors').write_bytes(bytes(flipped))
    cases['data'] = (tmp / 'flipped.safetensors', r'flipped\.safetensors: corrupted: the tensor data does not match its SHA-256')
    header = bytearray(good); header[20] = ord('\x01'); (tmp / 'header.safetensors').write_bytes(bytes(header))
    cases['header'] = (tmp / 'header.safetensors', r'header\.safetensors: cannot read it as a safetensors file')
    from safetensors.torch import save_file
    save_file({'w': torch.zeros(3)}, str(tmp / 'other.safetensors'))
    cases['not ptmq'] = (tmp / 'other.safetensors', r'other\.safetensors: not a ptmq model file')
    (tmp / 'text.safetensors').write_text('hello')
    cases['not safetensors'] = (tmp / 'text.safetensors', r'text\.safetensors: cannot read it as a safetensors file')
    cases['newer'] = (_rewrite(tmp / 'newer.safetensors', src, lambda r: r.update(format_version=str(FORMAT_VERSION + 1))),
                      rf'newer\.safetensors: written in ptmq model format {FORMAT_VERSION + 1}; this ptmq .* reads format {FORMAT_VERSION} and older: upgrade ptmq')
    def unknown(r):
        m = json.loads(r['ptmq']); m['architecture']['name'] = 'resnet9000'; r['ptmq'] = json.dumps(m)
    cases['architecture'] = (_rewrite(tmp / 'arch.safetensors', src, unknown),
                             r"arch\.safetensors: architecture 'resnet9000' cannot be built by this ptmq \(registered: cifar_resnet, .*register it with ptmq.register_architecture")
    def wrong_depth(r):
        m = json.loads(r['ptmq']); m['architecture']['config']['depth'] = 14; r['ptmq'] = json.dumps(m)
    cases['mismatch'] = (_rewrite(tmp / 'depth.safetensors', src, wrong_depth), r"depth\.safetensors: the quantized layers in the file do not match architecture 'cifar_resnet'")
    for what, (path, pattern) in cases.items():
        with pytest.raises(ModelFileError, match=pattern): load(path)
    assert load(src) is not None

def test_save_refuses_what_it_cannot_write_faithfully(tmp_path):
    qm = quantize_model(CifarResNet(8).eval(), 4, (4, 8), observer='minmax')
    with pytest.raises(ValueError, match=r'\.safetensors file'): save(qm, tmp_path / 'm.pt')
    set_weight_mode(qm, 'soft')
    with pytest.raises(ValueError, match='soft rounding .* round hard first'): save(qm, tmp_path / 'm.safetensors')
    lying = tiny_registry(config=lambda m: {'width': m.conv0.out_channels + 1, 'num_classes': m.fc.out_features})
    liar = quantize_model(TinyCNN().eval(), 4, (4, 8), observer='minmax', registry=lying)
    with pytest.raises(ValueError, match="architecture 'tiny_cnn' with config .* does not rebuild this model exactly"):
        save(liar, tmp_path / 'm.safetensors', registry=lying)
    assert not list(tmp_path.iterdir())          # nothing written, not even a partial file

def test_registry_errors():
    reg = tiny_registry()
    with pytest.raises(ValueError, match="'tiny_cnn' is already registered; pass replace=True"):
        reg.register(Architecture('tiny_cnn', TinyCNN, lambda m, s: [], lambda m: {}, lambda c: TinyCNN()))
    with pytest.raises(ValueError, match='plain name'): Architecture('../x', TinyCNN, lambda m, s: [], lambda m: {}, lambda c: TinyCNN())
    with pytest.raises(TypeError, match='no quantized wrapping for TinyCNN; registered architectures: .*register_architecture'):
        quantize_model(TinyCNN(), 4, (4, 8))                   # not in the package's registry
    with pytest.raises(ValueError, match=r"unexpected keys \['depth'\], missing keys \['width'\]"): config_args({'depth': 3, 'num_classes': 2}, width=int, num_classes=int)
    with pytest.raises(ValueError, match=r"ViT arguments \['block_fn'\] are not among those ptmq writes"):
        ARCHITECTURES['timm_vit'].build({'kwargs': {'depth': 2, 'block_fn': 'os.system'}})      # a file's config is data, checked
    assert ptmq.register_architecture is not None and callable(ptmq.save) and callable(ptmq.load)

def test_loaded_model_cannot_be_recalibrated(tmp_path):
    from ptmq.recon import PTMQConfig, calibrate
    save(calibrated_like(quantize_model(CifarResNet(8).eval(), 4, (4, 8), observer='minmax')), tmp_path / 'm.safetensors')
    back = load(tmp_path / 'm.safetensors')
    with pytest.raises(ValueError, match='holds integer codes only'):
        calibrate(back, torch.randn(8, 3, 32, 32), PTMQConfig(iters=1, groups={'low': [4], 'mid': [6], 'high': [8]}, single_bits=4, observe_images=8))

# ---------------------------------------------------------------- ONNX

def _onnx_graph(path):
    import onnx
    return onnx.load(str(path)).graph

@pytest.mark.parametrize('family', ['cifar_resnet20', 'timm_vit_token'])
def test_onnx_export_computes_the_model_at_each_bit_width(family, tmp_path):
    torch.manual_seed(0)
    qm = calibrated_like(quantize_model(FAMILIES[family][0]().eval(), 4, (3, 4, 8), observer='minmax'))
    x = torch.randn(6, 3, 32, 32)
    ref = outputs(qm, x)
    for b in qm.a_bits:
        with torch.no_grad(): assert torch.equal(export_module(qm, b)(x), ref[b])     # the QDQ copy is the model, bit for bit
        f = export_onnx(qm, tmp_path / f'a{b}.onnx', b, input_size=(3, 32, 32))
        out = torch.from_numpy(_session(f, exact=True).run(None, {'input': x.numpy()})[0])
        d = (out - ref[b]).abs()
        assert d.median() < 1e-5 and d.max() < 0.05 * ref[b].abs().max(), f"A{b}: onnxruntime differs beyond float rounding ({d.max():.2e})"
        g = _onnx_graph(f)
        ops = [n.op_type for n in g.node]
        assert ops.count('QuantizeLinear') >= 3 and ops.count('DequantizeLinear') >= ops.count('QuantizeLinear')
        inits = {i.name: i for i in g.initializer}
        clips = [n for n in g.node if n.op_type == 'Clip']
        if b < 8:
            import onnx.numpy_helper as nh
            consts = {o: nh.to_array(n.attribute[0].t) for n in g.node if n.op_type == 'Constant' for o in n.output}
            tops = {int((nh.to_array(inits[c.input[2]]) if c.input[2] in inits else consts[c.input[2]])) for c in clips}
            assert tops == {2 ** b - 1} and len(clips) == ops.count('QuantizeLinear') - 1   # every b-bit tensor clipped, not the 8-bit head input
        else: assert not clips
        layer = qm.units[1].body[0] if family == 'cifar_resnet20' else qm.units[1].fc1
        w = next(i for k, i in inits.items() if k.endswith('.wq.codes') and list(i.dims) == list(layer.layer.weight.shape))
        assert w.data_type == 2            # uint8 integer initializer holding codes, with per-channel scales beside it
    assert (tmp_path / 'a4.onnx').stat().st_size > 0

def test_check_onnx_and_the_export_command(tmp_path):
    from ptmq.data import make_toy_folder
    from ptmq.cli import main
    torch.manual_seed(0)
    qm = calibrated_like(quantize_model(CifarResNet(8).eval(), 4, (4, 8), observer='minmax'))
    folder = make_toy_folder(tmp_path / 'toy', classes=10, per_class=3, size=32)
    cfg = {'input_size': [3, 32, 32], 'mean': [0.5] * 3, 'std': [0.5] * 3, 'resize': False}
    save(qm, tmp_path / 'm.safetensors', data_config=cfg)
    res = export_command(tmp_path / 'm.safetensors', 4, tmp_path / 'm4.onnx', check=folder, batch_size=7)
    assert res['images'] == 30 and (tmp_path / 'm4.onnx').is_file()
    assert {'top1_torch', 'top1_onnx', 'agree', 'max_logit_diff', 'within_1e-3', 'top1_onnx_default', 'within_1e-3_torch_no_onednn',
            'ms_per_image_torch', 'ms_per_image_onnx'} <= set(res)
    assert 0 <= res['within_1e-3'] <= 100 and res['within_1e-3_torch_no_onednn'] <= 100
    assert res['agree'] >= 90 and res['max_logit_diff'] < 1.0
    assert main(['export', str(tmp_path / 'm.safetensors'), '--bits', '8']) == 0 and (tmp_path / 'm_a8.onnx').is_file()
    assert main(['export', str(tmp_path / 'm.safetensors'), '--bits', '6']) == 2            # not calibrated: stops before work
    assert main(['export', str(tmp_path / 'nope.safetensors'), '--bits', '4']) == 2
    with pytest.raises(ValueError, match=r"bit-width 6 is not calibrated in this model; available: \[4, 8\]"):
        export_command(tmp_path / 'm.safetensors', 6)
    with pytest.raises(FileNotFoundError, match='--check: data folder not found'):
        export_command(tmp_path / 'm.safetensors', 4, check=tmp_path / 'nowhere')
    save(qm, tmp_path / 'bare.safetensors')
    with pytest.raises(ValueError, match='records no preprocessing'): export_command(tmp_path / 'bare.safetensors', 4, check=folder)
