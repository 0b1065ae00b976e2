"""Tests of the backbone loader and the transfer-layer enumeration."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from skrtl._backbone import (
    DEFAULT_BACKBONE,
    BackboneWeightsError,
    backbone_data_config,
    describe_layers,
    get_transfer_layers,
    layer_of_parameters,
    load_backbone,
)


@pytest.fixture(scope="module")
def imagenet_model():
    return load_backbone(num_classes=1000)


def _classify(model, img: np.ndarray) -> torch.Tensor:
    cfg = backbone_data_config(model)
    x = torch.tensor(img / 255.0, dtype=torch.float32).permute(2, 0, 1)[None]
    x = F.interpolate(x, size=(224, 224), mode="bicubic", antialias=True, align_corners=False)
    mean = torch.tensor(cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        return model((x - mean) / std).softmax(1)[0]


def test_embedded_weights_recognise_imagenet_images(imagenet_model):
    skdata = pytest.importorskip("skimage.data")
    cat = _classify(imagenet_model, skdata.chelsea())
    assert int(cat.argmax()) in range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian
    assert float(cat[281:286].sum()) > 0.5
    coffee = _classify(imagenet_model, skdata.coffee())
    assert int(coffee.argmax()) == 967  # espresso


def test_embedded_normalisation_is_half():
    cfg = backbone_data_config(load_backbone())
    assert cfg["mean"] == (0.5, 0.5, 0.5)
    assert cfg["std"] == (0.5, 0.5, 0.5)
    assert cfg["min_size"] == 32


def test_feature_extractor_has_no_head_and_new_head_is_fresh():
    feat = load_backbone()
    assert feat.num_classes == 0
    assert feat(torch.zeros(1, 3, 64, 64)).shape == (1, 1280)
    clf = load_backbone(num_classes=2)
    assert clf(torch.zeros(2, 3, 64, 64)).shape == (2, 2)
    # the backbone part is pretrained in both
    torch.testing.assert_close(feat.conv_stem.weight, clf.conv_stem.weight)


def test_grayscale_first_conv_is_adapted():
    rgb = load_backbone()
    gray = load_backbone(in_chans=1)
    assert gray.conv_stem.weight.shape[1] == 1
    torch.testing.assert_close(gray.conv_stem.weight, rgb.conv_stem.weight.sum(1, keepdim=True))
    assert backbone_data_config(gray)["mean"] == (0.5,)


def test_scratch_differs_from_pretrained():
    a = load_backbone(pretrained=False)
    b = load_backbone()
    assert not torch.equal(a.conv_stem.weight, b.conv_stem.weight)


def test_local_safetensors_file_roundtrip(tmp_path):
    from safetensors.torch import save_file

    src = load_backbone("resnet18", pretrained=False, num_classes=10)
    path = tmp_path / "resnet18.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    # different head size: the classifier is dropped, the backbone loaded
    dst = load_backbone("resnet18", weights=path, num_classes=3)
    torch.testing.assert_close(dst.layer1[0].conv1.weight, src.layer1[0].conv1.weight)
    assert dst.fc.weight.shape == (3, 512)


def test_local_torch_file_with_checkpoint_layout(tmp_path):
    src = load_backbone("resnet18", pretrained=False)
    path = tmp_path / "ckpt.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in src.state_dict().items()}}, path)
    dst = load_backbone("resnet18", weights=path)
    torch.testing.assert_close(dst.conv1.weight, src.conv1.weight)


def test_corrupt_weights_file_gives_clear_error(tmp_path):
    path = tmp_path / "broken.pth"
    path.write_bytes(b"this is not a torch file")
    with pytest.raises(BackboneWeightsError, match="Could not read weights file"):
        load_backbone("resnet18", weights=path)
    st = tmp_path / "broken.safetensors"
    st.write_bytes(b"\x00\x01garbage")
    with pytest.raises(BackboneWeightsError, match="corrupt"):
        load_backbone("resnet18", weights=st)


class _Arbitrary:
    """A non-tensor object: unpickling it would run arbitrary code paths."""


def test_untrusted_pickle_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"conv1.weight": _Arbitrary()}, path)
    with pytest.raises(BackboneWeightsError, match="weights_only"):
        load_backbone("resnet18", weights=path)


def test_mismatched_weights_file_gives_clear_error(tmp_path):
    src = load_backbone("resnet18", pretrained=False)
    path = tmp_path / "resnet.pth"
    torch.save(src.state_dict(), path)
    with pytest.raises(BackboneWeightsError, match="do not match"):
        load_backbone(DEFAULT_BACKBONE, weights=path)
    with pytest.raises(BackboneWeightsError, match="does not exist"):
        load_backbone("resnet18", weights=tmp_path / "missing.pth")


def test_offline_download_failure_says_how_to_fix(monkeypatch):
    import timm

    real = timm.create_model

    def offline(name, pretrained=False, **kw):
        if pretrained:
            raise OSError("We couldn't connect to 'https://huggingface.co'")
        return real(name, pretrained=False, **kw)

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(BackboneWeightsError) as err:
        load_backbone("resnet18")
    msg = str(err.value)
    assert "weights=" in msg and DEFAULT_BACKBONE in msg and "pretrained=False" in msg


def test_bad_names_and_arguments():
    with pytest.raises(ValueError, match="not a timm architecture"):
        load_backbone("no_such_net")
    with pytest.raises(ValueError, match="in_chans"):
        load_backbone(in_chans=0)


@pytest.mark.parametrize(
    "name, expected_first, expected_last",
    [
        ("tf_efficientnet_lite0", "stem", "classifier"),
        ("resnet18", "stem", "classifier"),
        ("convnext_atto", "stem", "classifier"),
        ("densenet121", "stem", "classifier"),
        ("vit_tiny_patch16_224", "stem", "classifier"),
    ],
)
def test_transfer_layers_cover_every_parameter_once(name, expected_first, expected_last):
    model = load_backbone(name, pretrained=False, num_classes=2)
    layers = get_transfer_layers(model)
    names = [p for layer in layers for p in layer.param_names]
    all_params = [n for n, _ in model.named_parameters()]
    assert sorted(names) == sorted(all_params)
    assert len(names) == len(set(names))
    assert [layer.index for layer in layers] == list(range(1, len(layers) + 1))
    assert layers[0].name == expected_first and layers[-1].name == expected_last
    assert sum(layer.n_params for layer in layers) == sum(p.numel() for p in model.parameters())
    # the stem really is the input side of the network
    first_param = all_params[0]
    assert first_param in layers[0].param_names


def test_efficientnet_layers_and_batchnorm_modules():
    model = load_backbone(num_classes=2)
    layers = get_transfer_layers(model)
    assert [layer.name for layer in layers] == (
        ["stem"] + [f"blocks.{i}" for i in range(7)] + ["head", "classifier"]
    )
    stem_modules = layers[0].module_names
    assert "conv_stem" in stem_modules and "bn1" in stem_modules
    assert "blocks.6.0.bn1" in layers[7].module_names  # not mistaken for the stem's bn1
    mapping = layer_of_parameters(model)
    assert mapping["classifier.weight"] == 10 and mapping["conv_stem.weight"] == 1


def test_describe_layers_table():
    table = describe_layers(load_backbone("resnet18", pretrained=False, num_classes=2))
    assert list(table["name"]) == ["stem", "layer1", "layer2", "layer3", "layer4", "classifier"]
    assert table["n_params"].sum() == 11_177_538


@pytest.mark.parametrize(
    "name", ["tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2"]
)
def test_embedded_backbones_hold_real_imagenet_weights(name):
    """Every embedded backbone loads offline and recognises a cat as a cat (ImageNet 281-285)."""
    import importlib.util

    import torch.nn.functional as F

    from skrtl import EMBEDDED_BACKBONES, backbone_data_config

    skimage_data = pytest.importorskip("skimage.data")
    if importlib.util.find_spec(EMBEDDED_BACKBONES[name][0]) is None:
        pytest.skip(f"{EMBEDDED_BACKBONES[name][2]} is not installed")
    model = load_backbone(name, num_classes=1000)
    cfg = backbone_data_config(model)
    img = torch.from_numpy(skimage_data.chelsea().astype(np.float32) / 255).permute(2, 0, 1)
    x = F.interpolate(img[None], size=cfg["input_size"][1:], mode="bilinear", antialias=True)
    x = (x - torch.tensor(cfg["mean"]).view(1, 3, 1, 1)) / torch.tensor(cfg["std"]).view(
        1, 3, 1, 1
    )
    with torch.no_grad():
        top = int(model(x).argmax())
    assert 281 <= top <= 285  # the cat classes of ImageNet
