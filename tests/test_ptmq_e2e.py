"""A short real PTMQ run: ResNet-20 on CIFAR-10, one calibration, against round-to-nearest in QDrop's setting."""
import pytest
import torch
from conftest import need_shared
from ptmq.models import create_model
from ptmq.data import model_transform, image_folder, preload, evaluate, calibration_images, seeded_subset
from ptmq.recon import PTMQConfig, ptmq, round_to_nearest
from ptmq.blocks import set_bits


@pytest.fixture(scope='module')
def short_run():
    w = need_shared('weights', 'cifar10', 'resnet20-12fca82f.th')
    data = need_shared('data', 'cifar10')
    fp = create_model('cifar_resnet20', weights=w)
    tf = model_transform('cifar_resnet20')
    calib = calibration_images(data / 'train', tf, n=512, seed=0)
    test = preload(seeded_subset(image_folder(data / 'test', tf), 2000, seed=0))
    cfg = PTMQConfig(w_bits=4, iters=150, observe_images=256)
    rtn = round_to_nearest(fp, calib, cfg)
    qm = ptmq(fp, calib, cfg, progress=False)
    acc = {(m, b): evaluate(set_bits(model, b), test) for m, model in (('rtn', rtn), ('ptmq', qm)) for b in (4, 8)}
    print(acc)
    return qm, acc


def test_short_ptmq_run_keeps_a8_and_lowers_its_loss(short_run):
    qm, acc = short_run
    assert acc['ptmq', 8] >= acc['rtn', 8] - 0.5, acc
    hist = qm.calibration.history
    assert len({h['unit'] for h in hist}) == len(qm.units)
    first, last = [h for h in hist if h['unit'] == 3][0], [h for h in hist if h['unit'] == 3][-1]
    assert last['gd_fp'] < first['gd_fp']                      # the reconstruction loss goes down


# issue 14: with QDrop's observers round-to-nearest starts higher (W4A4 78.45 here, was ~74); the paper's MFM no longer
# gained a point at A4 in 150 iterations (78.30); the default since then (each pass on its own input, mfm='none') does.
def test_short_ptmq_run_beats_round_to_nearest_at_a4(short_run):
    qm, acc = short_run
    assert acc['ptmq', 4] >= acc['rtn', 4] + 1.0, acc
