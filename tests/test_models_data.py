import pytest
import torch
from conftest import need_shared
from ptmq.models import create_model, read_state_dict, WeightsError, cifar_resnet, model_spec
from ptmq.data import (model_transform, image_folder, preload, evaluate, calibration_images, make_toy_folder, seeded_subset,
                       match_labels, correct_per_image, top1_of)

def test_resnet20_checkpoint_reproduces_fp32_top1_exactly():
    w = need_shared('weights', 'cifar10', 'resnet20-12fca82f.th')
    test = need_shared('data', 'cifar10', 'test')
    model = create_model('cifar_resnet20', weights=w)
    ds = image_folder(test, model_transform('cifar_resnet20'))
    assert len(ds) == 10000 and ds.classes[0] == 'airplane'
    assert evaluate(model, ds, batch_size=500) == pytest.approx(81.03, abs=1e-9)   # 8103 / 10000, as measured by the data's provider

def test_per_image_correctness_is_in_data_order_and_gives_top1():
    torch.manual_seed(0)
    x, y = torch.randn(37, 5), torch.randint(0, 3, (37,))
    model = torch.nn.Linear(5, 3)
    data = torch.utils.data.TensorDataset(x, y)
    hit = correct_per_image(model, data, batch_size=8)                 # batches of 8: the last one short
    with torch.no_grad(): want = (model(x).argmax(1) == y).numpy()
    assert hit.dtype == bool and hit.shape == (37,) and (hit == want).all()
    assert evaluate(model, data, batch_size=8) == top1_of(hit) == 100.0 * want.sum() / 37
    with pytest.raises(ValueError, match='empty'): correct_per_image(model, torch.utils.data.TensorDataset(x[:0], y[:0]))

def test_weights_errors(tmp_path):
    with pytest.raises(WeightsError, match='not found'): create_model('cifar_resnet20', weights=tmp_path / 'nope.th')
    bad = tmp_path / 'bad.th'; bad.write_bytes(b'not a checkpoint')
    with pytest.raises(WeightsError, match='cannot read'): create_model('cifar_resnet20', weights=bad)
    other = tmp_path / 'r32.th'; torch.save({'state_dict': cifar_resnet(32, pretrained=False).state_dict()}, other)
    with pytest.raises(WeightsError, match='does not fit'): create_model('cifar_resnet20', weights=other)
    prefixed = tmp_path / 'dp.th'
    torch.save({'best_prec1': 1.0, 'state_dict': {f'module.{k}': v for k, v in cifar_resnet(20, pretrained=False).state_dict().items()}}, prefixed)
    assert all(not k.startswith('module.') for k in read_state_dict(prefixed))
    create_model('cifar_resnet20', weights=prefixed)
    with pytest.raises(ValueError, match='unknown model'): model_spec('resnet9000')

def test_offline_download_error_names_the_file(monkeypatch, tmp_path):
    def no_network(*a, **k): raise OSError('network unreachable')
    monkeypatch.setattr(torch.hub, 'download_url_to_file', no_network)
    monkeypatch.setattr(torch.hub, 'get_dir', lambda: str(tmp_path))
    with pytest.raises(WeightsError, match=r'resnet20-12fca82f\.th'): create_model('cifar_resnet20')

def test_calibration_images_seeded_and_folder_errors(tmp_path):
    root = make_toy_folder(tmp_path / 'toy', classes=3, per_class=5)
    tf = model_transform('cifar_resnet20')
    a, b = calibration_images(root, tf, n=6, seed=1), calibration_images(root, tf, n=6, seed=1)
    assert a.shape == (6, 3, 32, 32) and torch.equal(a, b)
    assert not torch.equal(a, calibration_images(root, tf, n=6, seed=2))
    assert len(seeded_subset(image_folder(root), 100)) == 15
    held = calibration_images(root, tf, n=8, seed=1, skip=6)                  # the next 8 images of the same seeded order
    both = calibration_images(root, tf, n=14, seed=1)
    assert torch.equal(both[:6], a) and torch.equal(both[6:], held)           # disjoint from the calibration set
    with pytest.raises(ValueError, match=r'toy: 15 items: 10 after the first 6 are not there \(only 9\)'):
        calibration_images(root, tf, n=10, seed=1, skip=6)
    with pytest.raises(ValueError, match='skip must be >= 0'): seeded_subset(image_folder(root), None, skip=2)
    with pytest.raises(FileNotFoundError, match='data folder not found'): image_folder(tmp_path / 'missing')
    (tmp_path / 'empty').mkdir()
    with pytest.raises(FileNotFoundError, match='not an ImageFolder'): image_folder(tmp_path / 'empty')

def test_labels_match_the_model_outputs(tmp_path):
    "wnid folders (any subset) get their ImageNet-1k index; a folder whose classes cannot be the model's is refused."
    root = make_toy_folder(tmp_path / 'toy', classes=3, per_class=2)
    for c, wnid in zip(('class0', 'class1', 'class2'), ('n15075141', 'n01443537', 'n01440764')): (root / c).rename(root / wnid)
    ds = match_labels(image_folder(root), 1000)       # folder order n01440764, n01443537, n15075141
    assert ds.targets == [0, 0, 1, 1, 999, 999] and [t for _, t in ds.samples] == ds.targets and ds[4][1] == 999
    assert match_labels(image_folder(root), 3).targets == [0, 0, 1, 1, 2, 2]      # a 3-class model: folder order
    with pytest.raises(ValueError, match='3 class folders but the model has 10 outputs'): match_labels(image_folder(root), 10)
    (root / 'n15075141').rename(root / 'n00000001')
    with pytest.raises(ValueError, match='not ImageNet-1k wnids'): match_labels(image_folder(root), 1000)
    for i, c in enumerate(sorted(p.name for p in root.iterdir())): (root / c).rename(root / str((2, 10, 11)[i]))
    assert match_labels(image_folder(root), 12).targets == [10, 10, 11, 11, 2, 2]     # folders '10', '11', '2': their numbers, not 0, 1, 2
    with pytest.raises(ValueError, match='class folder 11 but the model has 10 outputs'): match_labels(image_folder(root), 10)

def test_imagenet_preprocessing_comes_from_timm_data_config():
    tf = model_transform('resnet18')
    names = [type(t).__name__ for t in tf.transforms]
    assert names[:2] == ['Resize', 'CenterCrop'] and tf.transforms[1].size == (224, 224)
    deit = model_transform('deit_small_patch16_224')          # timm's own config of the model, also without the model at hand
    assert deit.transforms[0].size == 248 and deit.transforms[0].interpolation.value == 'bicubic'

@pytest.mark.parametrize('name,tag,resize', [('resnet18', None, 256), ('resnet50', None, 232), ('resnet50', 'IMAGENET1K_V1', 256),
                                             ('mobilenet_v2', 'IMAGENET1K_V2', 232)])
def test_torchvision_preprocessing_is_the_published_one_of_the_weight_set(name, tag, resize):
    "Built by timm from a data config, equal to torchvision's evaluation transform of those weights on an odd-sized image."
    from PIL import Image
    from ptmq.models import torchvision_weights
    img = Image.fromarray(torch.randint(0, 256, (300, 451, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)).numpy())
    tf = model_transform(name, weights=tag)
    assert tf.transforms[0].size == resize and tf.transforms[0].interpolation.value == 'bilinear'
    assert torch.equal(tf(img), torchvision_weights(name, tag).transforms()(img))

def test_torchvision_weight_set_by_name():
    from ptmq.models import torchvision_model, is_weights_tag
    assert is_weights_tag('IMAGENET1K_V1') and not is_weights_tag('weights/resnet50.pth') and not is_weights_tag(None)
    with pytest.raises(WeightsError, match="torchvision has no weights 'IMAGENET1K_V9' for resnet50; published: IMAGENET1K_V1, IMAGENET1K_V2"):
        torchvision_model('resnet50', 'IMAGENET1K_V9')

def test_torchvision_offline_error_names_the_file_and_where_to_put_it(tmp_path, monkeypatch):
    import torchvision.models._api as api
    def no_network(*a, **k): raise OSError('no network')
    monkeypatch.setattr(api, 'load_state_dict_from_url', no_network)
    monkeypatch.setattr(torch.hub, 'get_dir', lambda: str(tmp_path))
    with pytest.raises(WeightsError) as e: create_model('resnet18')
    msg = str(e.value)
    assert 'https://download.pytorch.org/models/resnet18-f37072fd.pth' in msg
    assert str(tmp_path / 'checkpoints' / 'resnet18-f37072fd.pth') in msg and '`weights:`' in msg

def test_timm_offline_error_then_the_named_file_is_used(tmp_path, monkeypatch):
    "No network and no local copy: the error names the exact file and place; a file put there loads (safetensors)."
    import timm
    from safetensors.torch import save_file
    from ptmq.models import timm_weights_source
    monkeypatch.setenv('PTMQ_CACHE', str(tmp_path))
    real = timm.create_model
    def offline(name, pretrained=False, **kw):
        if pretrained: raise OSError('no network')
        return real(name, pretrained=False, **kw)
    monkeypatch.setattr(timm, 'create_model', offline)
    url, local = timm_weights_source('deit_small_patch16_224')
    assert url == 'https://huggingface.co/timm/deit_small_patch16_224.fb_in1k/resolve/main/model.safetensors'
    assert local == tmp_path / 'weights' / 'deit_small_patch16_224.fb_in1k.safetensors'
    with pytest.raises(WeightsError) as e: create_model('deit_small_patch16_224')
    assert url in str(e.value) and str(local) in str(e.value)
    ref = real('deit_small_patch16_224', pretrained=False)
    local.parent.mkdir(parents=True); save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(local))
    m = create_model('deit_small_patch16_224')
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), ref.state_dict().values()))
    with pytest.raises(WeightsError, match='cannot read weights file'):
        bad = tmp_path / 'bad.safetensors'; bad.write_bytes(b'not safetensors'); create_model('deit_small_patch16_224', weights=bad)
