"""The network: shapes, named outputs, architecture facts, TorchScript and sliding-window inference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from monai.inferers import sliding_window_inference

from dualssl.config import ConfigError, ModelConfig
from dualssl.models import SegmentationNet, WSConv3d, build_model
from dualssl.models.unet3d import upsample_nearest2x

WIDTHS = (8, 16, 32, 64)


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return build_model(ModelConfig(widths=WIDTHS, embed_dim=32))


def test_named_outputs_and_shapes(net):
    x = torch.rand(2, 1, 32, 24, 16)
    plain = net(x)
    assert set(plain) == {"logits"}
    assert plain["logits"].shape == (2, 2, 32, 24, 16)
    out = net(x, embeddings=True, restoration=True)
    assert out["embeddings"].shape == (2, 32, 4, 3, 2)
    norms = out["embeddings"].norm(dim=1)
    assert torch.all(((norms - 1).abs() < 1e-4) | (norms < 1e-6))  # unit vectors (or all-zero after the ReLU)
    assert (out["embeddings"] >= 0).all()  # ReLU before the normalisation
    assert out["restored"].shape == (2, 1, 32, 24, 16)
    assert 0 <= float(out["restored"].min()) and float(out["restored"].max()) <= 1


def test_heads_not_asked_for_are_not_run(net):
    calls = {"proj": 0, "rec": 0}
    hooks = [net.proj_head.register_forward_hook(lambda *a: calls.__setitem__("proj", calls["proj"] + 1)),
             net.rec_head.register_forward_hook(lambda *a: calls.__setitem__("rec", calls["rec"] + 1))]
    try:
        net.zero_grad(set_to_none=True)
        net(torch.rand(1, 1, 16, 16, 16))["logits"].sum().backward()
        assert calls == {"proj": 0, "rec": 0}
        assert all(p.grad is None for p in net.proj_head.parameters())
        assert all(p.grad is None for p in net.rec_head.parameters())
        net(torch.rand(1, 1, 16, 16, 16), restoration=True)
        assert calls == {"proj": 0, "rec": 1}
    finally:
        for h in hooks:
            h.remove()


def test_architecture_follows_the_method(net):
    bb = net.backbone
    assert bb.dilated.conv1.dilation == (2, 2, 2) and bb.enc3.conv1.dilation == (1, 1, 1)
    assert [m.stride for m in (bb.down1[-1], bb.down2[-1], bb.down3[-1])] == [(2, 2, 2)] * 3
    norms = [m for m in net.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all(m.num_groups == 8 for m in norms)
    convs3 = [m for m in bb.modules() if isinstance(m, torch.nn.Conv3d) and m.kernel_size == (3, 3, 3)]
    assert convs3 and all(isinstance(m, WSConv3d) for m in convs3)
    assert isinstance(bb.fusion[2], torch.nn.Dropout3d)
    assert [bb.stem.out_channels, bb.down1[-1].out_channels, bb.down2[-1].out_channels,
            bb.down3[-1].out_channels] == list(WIDTHS)
    x = torch.rand(1, 1, 16, 16, 16)
    bottleneck, features = bb(x)
    assert bottleneck.shape == (1, 64, 2, 2, 2) and features.shape == (1, 8, 16, 16, 16)


def test_dropout_only_in_training(net):
    x = torch.rand(1, 1, 16, 16, 16)
    net.eval()
    with torch.no_grad():
        assert torch.equal(net(x)["logits"], net(x)["logits"])
    net.train()
    torch.manual_seed(1)
    with torch.no_grad():
        assert not torch.equal(net(x)["logits"], net(x)["logits"])


def test_weight_standardisation_ignores_kernel_scale_and_offset():
    torch.manual_seed(0)
    conv = WSConv3d(3, 4, 3, padding=1, bias=False)
    x = torch.rand(1, 3, 6, 6, 6)
    w = conv.weight.detach()
    flat = w.reshape(4, -1)
    expected_w = (w - flat.mean(1).reshape(-1, 1, 1, 1, 1)) / (
        flat.std(1, unbiased=False).reshape(-1, 1, 1, 1, 1) * flat.shape[1] ** 0.5)
    expected = F.conv3d(x, expected_w, padding=1)
    assert torch.allclose(conv(x), expected, atol=1e-5)
    with torch.no_grad():
        conv.weight.mul_(7.0).add_(3.0)
    assert torch.allclose(conv(x), expected, atol=1e-4)


def test_upsample_matches_nearest_interpolation():
    x = torch.rand(2, 3, 3, 4, 5)
    assert torch.equal(upsample_nearest2x(x), F.interpolate(x, scale_factor=2, mode="nearest"))


def test_widths_come_from_config_and_bad_config_is_named():
    net = build_model(ModelConfig(widths=(16, 16, 32, 32), num_classes=3, embed_dim=8))
    assert net.seg_head.conv.out_channels == 3 and net.proj_head.conv.out_channels == 8
    assert net.backbone.down3[-1].out_channels == 32
    with pytest.raises(ConfigError, match="model.widths"):
        build_model(ModelConfig(widths=(8, 12, 32, 64)))
    with pytest.raises(ConfigError, match="model.widths"):
        build_model(ModelConfig(widths=(8, 16, 32)))


def test_input_not_multiple_of_8_is_a_clear_error(net):
    with pytest.raises(ValueError, match="multiple of 8"):
        net(torch.rand(1, 1, 20, 16, 16))


def test_segmentation_net_scripts_traces_and_slides(net):
    net.eval()
    seg = SegmentationNet(net).eval()
    assert set(k.split(".")[0] for k in seg.state_dict()) == {"backbone", "seg_head"}
    x = torch.rand(1, 1, 16, 16, 16)
    with torch.no_grad():
        ref = net(x)["logits"]
        scripted = torch.jit.script(seg)
        traced = torch.jit.trace(seg, x)
        assert torch.allclose(scripted(x), ref, atol=1e-5)
        assert torch.allclose(traced(x), ref, atol=1e-5)
        # one window covering the image: identical to a direct call
        assert torch.allclose(sliding_window_inference(x, (16, 16, 16), 1, scripted), ref, atol=1e-5)
        # a volume that is neither a multiple of 8 nor of the window
        big = sliding_window_inference(torch.rand(1, 1, 27, 21, 13), (16, 16, 16), 2, scripted, overlap=0.25)
    assert big.shape == (1, 2, 27, 21, 13) and torch.isfinite(big).all()


def test_the_network_learns_a_blob():
    torch.manual_seed(0)
    net = build_model(ModelConfig(widths=WIDTHS, dropout=0.0))
    label = torch.zeros(1, 1, 16, 16, 16)
    label[:, :, 4:11, 5:12, 6:10] = 1
    image = 0.3 + 0.4 * label + 0.05 * torch.randn_like(label)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        loss = F.cross_entropy(net(image)["logits"], label[:, 0].long())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0]
