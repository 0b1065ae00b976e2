"""True 3-D transfer: ACS / inflated networks from 2-D backbones, and the volumetric estimators."""

from __future__ import annotations

import pickle
from types import SimpleNamespace

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import blob_volumes
from torch import nn

from skrtl import (
    AdaBN,
    FineTuneClassifier,
    PretrainedCNNFeatures,
    convert_to_3d,
    get_transfer_layers,
    load_backbone,
    make_image_frame,
)
from skrtl._adabn import bn_layers
from skrtl._transfer import layerwise_param_groups, stage_list
from skrtl._volumetric import ACSConv3d, InflatedConv3d, VolumetricRunner, acs_split
from skrtl.utils import bf16_supported

# small random-weight members of every supported family (plus the embedded default)
FAMILIES = ["tf_efficientnet_lite0", "efficientnet_b0", "resnet18", "convnext_atto"]


def _random_2d(name: str, num_classes: int = 2) -> nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=num_classes).eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return model


def _volume_frame(n=8, depth=8, size=32, seed=0):
    vols, y, masks = blob_volumes(n=n, depth=depth, size=size, seed=seed)
    return make_image_frame(list(vols), masks=list(masks), spacing=(2.0, 0.7, 0.7)), y


# --------------------------------------------------------------------------------------------
# the conversion
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", FAMILIES)
def test_inflation_identity_a_repeated_slice_gives_the_2d_features(name):
    # the inflated network with its default replicated depth padding: every depth of the 3-D
    # feature map equals the 2-D feature map of the slice, and so does 3-D average pooling
    model = _random_2d(name)
    net3d = convert_to_3d(model, "inflate")
    x2 = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    x3 = x2.unsqueeze(2).expand(-1, -1, 32, -1, -1).contiguous()
    with torch.no_grad():
        f2 = model.forward_features(x2)
        f3 = net3d.forward_features(x3)
        logits2, logits3 = model(x2), net3d(x3)
    scale = float(f2.abs().max())
    torch.testing.assert_close(f3, f2.unsqueeze(2).expand_as(f3), atol=1e-4 * scale, rtol=0)
    torch.testing.assert_close(logits3, logits2, atol=1e-4, rtol=1e-4)


def test_zero_depth_padding_breaks_the_identity_only_at_the_depth_borders():
    model = _random_2d("resnet18")
    net3d = convert_to_3d(model, "inflate", depth_padding="zeros")
    conv2, conv3 = model.conv1, net3d.conv1  # 7 x 7, stride 2, padding 3
    x2 = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        y2 = conv2(x2)
        y3 = conv3(x2.unsqueeze(2).expand(-1, -1, 16, -1, -1))
    torch.testing.assert_close(y3[:, :, 2:-2], y2.unsqueeze(2).expand_as(y3[:, :, 2:-2]))
    assert not torch.allclose(y3[:, :, 0], y2, atol=1e-3)


@pytest.mark.parametrize("method", ["acs", "inflate"])
@pytest.mark.parametrize("name", FAMILIES)
def test_3d_transfer_layers_map_one_to_one_onto_the_2d_layers(name, method):
    model = _random_2d(name)
    net3d = convert_to_3d(model, method)
    l2, l3 = get_transfer_layers(model), get_transfer_layers(net3d)
    assert [(t.index, t.name, t.param_names) for t in l2] == [
        (t.index, t.name, t.param_names) for t in l3
    ]
    names = [p for t in l3 for p in t.param_names]
    assert len(names) == len(set(names))  # every parameter exactly once ...
    assert set(names) == {n for n, _ in net3d.named_parameters()}  # ... and all of them
    if method == "acs":  # ACS keeps the 2-D shapes and counts
        assert {n: p.shape for n, p in model.named_parameters()} == {
            n: p.shape for n, p in net3d.named_parameters()
        }
    # layer-wise learning rates and the frozen-prefix stages work on the 3-D network
    groups = layerwise_param_groups(net3d, lr=1e-3, gamma=0.5, freeze_depth=2)
    assert [g["layer"] for g in groups] == list(range(3, len(l3) + 1))
    assert stage_list(net3d) is not None


@pytest.mark.parametrize("method", ["acs", "inflate"])
def test_batchnorm_becomes_batchnorm3d_with_the_same_statistics(method):
    model = _random_2d("tf_efficientnet_lite0")
    net3d = convert_to_3d(model, method)
    bn2, bn3 = dict(bn_layers(model)), dict(bn_layers(net3d))
    assert bn2.keys() == bn3.keys() and len(bn3) > 40
    for name, m in bn3.items():
        assert isinstance(m, nn.BatchNorm3d)
        torch.testing.assert_close(m.running_mean, bn2[name].running_mean)
        torch.testing.assert_close(m.running_var, bn2[name].running_var)
    assert not any(isinstance(m, nn.Conv2d | nn.BatchNorm2d) for m in net3d.modules())


def test_acs_groups_apply_their_2d_kernels_in_the_axial_coronal_and_sagittal_planes():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1, bias=False)
    acs = ACSConv3d(conv, same=False)
    a, c, _ = acs_split(6)
    assert (a, c) == (2, 2)
    x = torch.randn(1, 4, 5, 6, 7)
    with torch.no_grad():
        y = acs(x)
        # axial: every depth slice (H, W) convolved with the first kernels
        ax = conv(x[0].permute(1, 0, 2, 3))[:, :a].permute(1, 0, 2, 3)
        # coronal: every row h gives a (D, W) image
        co = conv(x[0].permute(2, 0, 1, 3))[:, a : a + c].permute(1, 2, 0, 3)
        # sagittal: every column w gives a (D, H) image
        sa = conv(x[0].permute(3, 0, 1, 2))[:, a + c :].permute(1, 2, 3, 0)
    torch.testing.assert_close(y[0, :a], ax)
    torch.testing.assert_close(y[0, a : a + c], co)
    torch.testing.assert_close(y[0, a + c :], sa)


@pytest.mark.parametrize("method", ["acs", "inflate"])
def test_tf_same_padding_in_3d_matches_the_2d_network_slice_by_slice(method):
    # lite0's strided convs use TensorFlow "same" padding (timm Conv2dSame); on a volume that
    # is constant along depth the axial kernels / inflated kernels reproduce it per slice
    model = load_backbone(pretrained=False)
    conv2 = model.conv_stem  # Conv2dSame, 3 x 3, stride 2
    conv3 = convert_to_3d(model, method).conv_stem
    x2 = torch.randn(1, 3, 17, 17)
    with torch.no_grad():
        y2 = conv2(x2)
        y3 = conv3(x2.unsqueeze(2).expand(-1, -1, 9, -1, -1))
    assert y3.shape[2:] == (5, 9, 9)
    n = acs_split(y2.shape[1])[0] if method == "acs" else y2.shape[1]
    torch.testing.assert_close(y3[:, :n, 2], y2[:, :n], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["acs", "inflate"])
@pytest.mark.parametrize("stride, same", [(1, False), (2, True), (2, False)])
def test_depthwise_training_path_has_the_exact_gradients(method, stride, same):
    # depthwise convs train through a custom backward pass (oneDNN's is very slow on CPUs)
    from timm.layers import Conv2dSame

    torch.manual_seed(0)
    if same:
        conv2 = Conv2dSame(6, 6, 5, stride, groups=6, bias=True)
    else:
        conv2 = nn.Conv2d(6, 6, 5, stride, 2, groups=6, bias=True)
    conv2 = conv2.double()
    conv = (
        ACSConv3d(conv2, same=same)
        if method == "acs"
        else InflatedConv3d.inflate(conv2, same=same, depth_padding="replicate")
    )
    x = torch.randn(2, 6, 3, 6, 7, dtype=torch.float64, requires_grad=True)
    y = conv(x)
    go = torch.randn_like(y)
    fast = torch.autograd.grad(y, [x, conv.weight, conv.bias], go)
    # reference: plain autograd through F.conv3d of the dense kernel
    w3 = conv.kernel3d() if method == "acs" else conv.weight
    xp = x
    if method == "inflate":
        xp = F.pad(x, (0, 0, 0, 0, 2, 2), mode="replicate")
    if same:
        from skrtl._volumetric import _same_pad

        pads = [_same_pad(xp.shape[2 + i], 5, stride, 1) for i in range(3)]
        if method == "inflate":
            pads[0] = (0, 0)
        xp = F.pad(xp, (*pads[2], *pads[1], *pads[0]))
        ref = F.conv3d(xp, w3, conv.bias, stride, 0, 1, 6)
    else:
        pad = (0, 2, 2) if method == "inflate" else (2, 2, 2)
        ref = F.conv3d(xp, w3, conv.bias, stride, pad, 1, 6)
    torch.testing.assert_close(y, ref)
    slow = torch.autograd.grad(ref, [x, conv.weight, conv.bias], go)
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b)


def test_unknown_modules_raise_instead_of_running_with_2d_assumptions():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            return self.conv(x).mean((2, 3))

    with pytest.raises(ValueError, match="no 3-D counterpart is known for module '<root>'"):
        convert_to_3d(Odd())
    with pytest.raises(ValueError, match="method must be one of"):
        convert_to_3d(_random_2d("resnet18"), "i3d")
    net3d = convert_to_3d(_random_2d("resnet18"))
    with pytest.raises(ValueError, match="already a 3-D network"):
        convert_to_3d(net3d)


@pytest.mark.parametrize("method", ["acs", "inflate"])
def test_inference_runner_reproduces_the_3d_network(method):
    net3d = convert_to_3d(_random_2d("efficientnet_b0"), method)
    runner = VolumetricRunner(
        net3d,
        layer_modules=["blocks.2", ""],
        in_chans=3,
        size=(32, 32, 32),
        device=torch.device("cpu"),
        precision="fp32",
    )
    x = torch.randn(2, 3, 32, 32, 32)
    captured = {}
    hook = net3d.blocks[2].register_forward_hook(lambda m, a, out: captured.update(b2=out))
    try:
        with torch.no_grad():
            ref = net3d.forward_features(x)
    finally:
        hook.remove()
    b2, final = runner(x)
    torch.testing.assert_close(final, ref, atol=1e-4 * float(ref.abs().max()), rtol=1e-4)
    torch.testing.assert_close(b2, captured["b2"], atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------------------------
# the estimators
# --------------------------------------------------------------------------------------------
def test_volumetric_features_pool_the_mask_on_the_3d_grid():
    frame, _ = _volume_frame(n=3)
    fe = PretrainedCNNFeatures(
        mode="3d",
        volumetric="acs",
        input_size=32,
        layers=["blocks.1"],
        precision="fp32",
        cache=False,
    ).fit(frame)
    assert fe.preprocessor_.is_volumetric and fe.preprocessor_.size == (32, 32, 32)
    got = fe.transform(frame)
    # by hand: the runner's 3-D map, weighted by the mask area-averaged onto its grid
    x, m, _ = next(fe.preprocessor_.iter_batches(fe._read(frame), range(3), 8))
    assert x.shape == (3, 3, 32, 32, 32) and m.shape == (3, 1, 32, 32, 32)
    (fmap,) = fe._get_fast()(x)
    assert fmap.dim() == 5
    w = F.adaptive_avg_pool3d(m, fmap.shape[2:])
    expected = (fmap * w).sum((2, 3, 4)) / w.sum((2, 3, 4))
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-5, atol=1e-6)
    unmasked = PretrainedCNNFeatures(
        mode="3d",
        volumetric="acs",
        input_size=32,
        layers=["blocks.1"],
        precision="fp32",
        cache=False,
        mask_pooling=False,
    ).fit(frame)
    assert not np.allclose(unmasked.transform(frame), got, atol=1e-3)


def test_volumetric_fit_predict_pickle_and_prefix_cache():
    frame, y = _volume_frame()
    clf = FineTuneClassifier(
        mode="3d",
        volumetric="acs",
        input_size=32,
        max_epochs=2,
        batch_size=4,
        n_estimators=2,
        freeze_depth=3,
        validation_fraction=None,
        random_state=0,
    ).fit(frame, y)
    assert clf.cached_prefix_ == 3  # stem + two block groups: computed once, streamed
    assert clf.n_layers_ == 10 and clf.layer_names_[0] == "stem"
    assert clf._tta_flips() == ((), (-1,), (-2,), (-3,))
    proba = clf.predict_proba(frame)
    assert proba.shape == (8, 2) and np.allclose(proba.sum(1), 1)
    again = pickle.loads(pickle.dumps(clf))
    np.testing.assert_allclose(again.predict_proba(frame), proba, rtol=1e-6, atol=1e-6)
    # the same optimizer groups as the 2-D network of the backbone
    groups = [g["layer"] for g in clf.net_.optimizer_.param_groups]
    assert groups == list(range(4, 11))
    # lr_schedule="auto" of a 3-D network: the warm-up, stepped per batch
    scheduler = dict(clf.nets_[0].callbacks_)["lr_scheduler"]
    assert scheduler.policy is torch.optim.lr_scheduler.LambdaLR
    assert scheduler.step_every == "batch"
    # the network is 3-D and takes volumes
    module = clf._skrtl_torch_module()
    x, _ = next(clf._skrtl_iter_inputs(frame))
    assert x.shape[1:] == (3, 32, 32, 32)
    assert any(isinstance(m, ACSConv3d) for m in module.modules())


def test_volumetric_training_from_random_weights_with_augmentation_is_reproducible():
    frame, y = _volume_frame(n=6)
    kw = dict(
        mode="3d",
        volumetric="inflate",
        input_size=32,
        max_epochs=1,
        batch_size=3,
        n_estimators=1,
        pretrained=False,
        augment=True,
        validation_fraction=None,
        tta=False,
    )
    a = FineTuneClassifier(random_state=0, **kw).fit(frame, y).predict_proba(frame)
    b = FineTuneClassifier(random_state=0, **kw).fit(frame, y).predict_proba(frame)
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_adabn_reestimates_the_batchnorm3d_statistics():
    src, _ = _volume_frame(n=6, seed=0)
    vols, _, masks = blob_volumes(n=6, depth=8, seed=1)
    tgt = make_image_frame(
        [3.0 * v + 1.0 for v in vols], masks=list(masks), spacing=(2.0, 0.7, 0.7)
    )
    fe = PretrainedCNNFeatures(
        mode="3d", volumetric="acs", input_size=32, precision="fp32", cache=False
    )
    ada = AdaBN(fe, site_column=None).fit(src, X_target=tgt)
    source, target = ada.bn_stats_["__source__"], ada.bn_stats_["__target__"]
    assert source.keys() == target.keys() == dict(bn_layers(ada.estimator_.model_)).keys()
    assert all(isinstance(m, nn.BatchNorm3d) for _, m in bn_layers(ada.estimator_.model_))
    moved = [not torch.allclose(source[k][0], target[k][0]) for k in source]
    assert len(moved) == 49 and sum(moved) > 40
    plain = PretrainedCNNFeatures(
        mode="3d", volumetric="acs", input_size=32, precision="fp32", cache=False
    ).fit(src)
    assert not np.allclose(ada.transform(tgt), plain.transform(tgt), atol=1e-4)


def test_volumetric_parameters_are_checked():
    frame, y = _volume_frame(n=4)
    with pytest.raises(ValueError, match="needs mode='3d'"):
        PretrainedCNNFeatures(mode="2.5d", volumetric="acs").fit(frame)
    with pytest.raises(ValueError, match=r"triple \(depth, height, width\)"):
        PretrainedCNNFeatures(mode="3d", volumetric="acs", input_size=(32, 32)).fit(frame)
    fe = PretrainedCNNFeatures(mode="3d", volumetric="inflate", precision="fp32")
    assert fe._check_image_params()[0] == (64, 64, 64)  # input_size="auto"
    assert FineTuneClassifier()._check_image_params()[0] == (128, 128)
    assert PretrainedCNNFeatures()._check_image_params()[0] == (224, 224)


@pytest.mark.parametrize("same", [False, True])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("groups, cin, cout", [(1, 4, 7), (6, 6, 6)])
def test_acs_training_path_of_batched_2d_convolutions_is_exact(same, stride, groups, cin, cout):
    # in training on CPUs an ACS conv runs as three batched 2-D convolutions (one per plane):
    # output and gradients equal the dense k x k x k kernel's through plain autograd
    from timm.layers import Conv2dSame

    from skrtl._volumetric import _acs_planes_conv3d, _pad, _pads

    torch.manual_seed(0)
    if same:
        conv2 = Conv2dSame(cin, cout, 3, stride, groups=groups, bias=True)
    else:
        conv2 = nn.Conv2d(cin, cout, 3, stride, 1, groups=groups, bias=True)
    acs = ACSConv3d(conv2.double(), same=same)
    x = torch.randn(2, cin, 5, 6, 7, dtype=torch.float64, requires_grad=True)
    y = _acs_planes_conv3d(acs, x)
    xx, pads = _pads(x, (3, 3, 3), acs.stride, acs.dilation, acs.padding, same, "zeros")
    ref = F.conv3d(_pad(xx, pads), acs.kernel3d(), acs.bias, acs.stride, 0, 1, groups)
    torch.testing.assert_close(y, ref)
    go = torch.randn_like(y)
    got = torch.autograd.grad(y, [x, acs.weight, acs.bias], go)
    want = torch.autograd.grad(ref, [x, acs.weight, acs.bias], go)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_volumetric_survival_fine_tune_fits_and_predicts_risks():
    from skrtl import FineTuneSurvival, make_survival_target

    frame, y = _volume_frame(n=8)
    rng = np.random.default_rng(0)
    target = make_survival_target(np.arange(8) % 3 != 0, rng.exponential(10, 8) + y)
    model = FineTuneSurvival(
        mode="3d",
        volumetric="inflate",
        input_size=32,
        max_epochs=1,
        batch_size=4,
        n_estimators=1,
        freeze_depth=4,
        validation_fraction=None,
        random_state=0,
    ).fit(frame, target)
    assert model.cached_prefix_ == 4 and model._tta_flips() == ((), (-1,), (-2,), (-3,))
    risk = model.predict(frame)
    assert risk.shape == (8,) and np.isfinite(risk).all()
    np.testing.assert_allclose(risk.mean(), 0.0, atol=1e-6)  # centred on the training risks
    assert any(isinstance(m, InflatedConv3d) for m in model._skrtl_torch_module().modules())


def test_explain_refuses_a_3d_network():
    from skrtl import explain

    frame, y = _volume_frame(n=6)
    clf = FineTuneClassifier(
        mode="3d",
        volumetric="acs",
        input_size=32,
        max_epochs=1,
        n_estimators=1,
        strategy="linear_probe",
        validation_fraction=None,
        random_state=0,
    ).fit(frame, y)
    with pytest.raises(ValueError, match="saliency maps are 2-D"):
        explain(clf, frame)


@pytest.mark.parametrize("method", ["acs", "inflate"])
def test_depthwise_training_path_under_bf16_autocast(method):
    # precision="bf16" trains under CPU autocast; the custom backward runs outside it and got a
    # bfloat16 output gradient with a float32 kernel (a dtype error) before it cast them
    torch.manual_seed(0)
    conv2 = nn.Conv2d(6, 6, 3, 1, 1, groups=6, bias=True)
    conv = (
        ACSConv3d(conv2, same=False)
        if method == "acs"
        else InflatedConv3d.inflate(conv2, same=False, depth_padding="zeros")
    )
    x = torch.randn(2, 6, 4, 5, 5, requires_grad=True)
    w3 = conv.kernel3d() if method == "acs" else conv.weight
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = conv(x)
        ref = F.conv3d(x, w3, conv.bias, 1, 1, 1, 6)
    assert y.dtype == torch.bfloat16
    go = torch.randn_like(y)
    got = torch.autograd.grad(y, [x, conv.weight, conv.bias], go)
    want = torch.autograd.grad(ref, [x, conv.weight, conv.bias], go)
    for a, b, like in zip(got, want, (x, conv.weight, conv.bias)):
        assert a.dtype == like.dtype == torch.float32
        # both round to bfloat16, in different orders of summation
        torch.testing.assert_close(a, b.to(a.dtype), atol=0.05 * float(b.abs().max()), rtol=0.05)
    # and a tiny bf16 3-D fit runs end to end (on CPUs with bf16 kernels)
    if not bf16_supported(torch.device("cpu")):
        return
    frame, yy = _volume_frame(n=6)
    clf = FineTuneClassifier(
        mode="3d",
        volumetric=method,
        input_size=32,
        max_epochs=1,
        batch_size=3,
        n_estimators=1,
        freeze_depth=5,
        precision="bf16",
        validation_fraction=None,
        random_state=0,
    ).fit(frame, yy)
    proba = clf.predict_proba(frame)
    assert proba.shape == (6, 2) and np.isfinite(proba).all()


@pytest.mark.parametrize("stride", [1, 2])
def test_inflated_depthwise_gradients_on_maps_smaller_than_the_kernel(stride):
    # deep 2 x 2 x 2 maps with 5 x 5 x 5 kernels: taps reading only padding are cropped and
    # the weight gradient of the cropped taps is computed in one grouped convolution
    torch.manual_seed(0)
    conv2 = nn.Conv2d(6, 6, 5, stride, 2, groups=6, bias=False).double()
    conv = InflatedConv3d.inflate(conv2, same=False, depth_padding="zeros")
    x = torch.randn(3, 6, 2, 2, 3, dtype=torch.float64, requires_grad=True)
    y = conv(x)
    ref = F.conv3d(x, conv.weight, None, stride, 2, 1, 6)
    torch.testing.assert_close(y, ref)
    go = torch.randn_like(y)
    got = torch.autograd.grad(y, [x, conv.weight], go)
    want = torch.autograd.grad(ref, [x, conv.weight], go)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_volumetric_auto_defaults_freeze_half_stop_sooner_and_use_48_cubes():
    # the "auto" values of a 3-D network: at least half of the layers frozen, patience 2,
    # stopping on the validation AUC, a 48^3 cube; 2-D networks keep the advisor's depth,
    # patience 5, the validation loss and 128 px
    model = _random_2d("tf_efficientnet_lite0")
    flat, cube = FineTuneClassifier(), FineTuneClassifier(mode="3d", volumetric="inflate")
    slices = FineTuneClassifier(mode="3d")
    _, L, k_2d, _ = flat._resolve_structure(model, 1188, 2)
    _, _, k_3d, _ = cube._resolve_structure(model, 1188, 2)
    assert (L, k_2d, k_3d) == (10, 3, 5)
    assert slices._resolve_structure(model, 1188, 2)[2] == 3  # slice-wise is a 2-D network
    # fewer samples: the advisor already freezes half of the layers, and that is kept
    assert cube._resolve_structure(model, 200, 2)[2] == flat._resolve_structure(model, 200, 2)[2]
    assert (flat._patience(), cube._patience(), slices._patience()) == (5, 2, 5)
    assert FineTuneClassifier(mode="3d", volumetric="acs", patience=4)._patience() == 4
    # early_stopping="auto" watches the validation AUC of a 3-D network, the loss otherwise
    plan = SimpleNamespace(n_out=2)
    assert cube._early_stopping_monitor(plan) == ("valid_auc", False)
    assert flat._early_stopping_monitor(plan) == ("valid_loss", True)
    assert slices._early_stopping_monitor(plan) == ("valid_loss", True)
    loss_cube = FineTuneClassifier(mode="3d", volumetric="inflate", early_stopping="loss")
    assert loss_cube._early_stopping_monitor(plan) == ("valid_loss", True)
    assert cube._check_image_params()[0] == (48, 48, 48)
    assert flat._check_image_params()[0] == (128, 128)
    # lr_schedule="auto" warms a 3-D network up; 2-D and slice-wise networks keep the cosine
    assert (flat._lr_schedule(), cube._lr_schedule(), slices._lr_schedule()) == (
        "cosine",
        "warmup_cosine",
        "cosine",
    )
    cosine_cube = FineTuneClassifier(mode="3d", volumetric="acs", lr_schedule="cosine")
    assert cosine_cube._lr_schedule() == "cosine"
    with pytest.raises(ValueError, match="patience"):
        FineTuneClassifier(patience="soon")._validate_params()
