"""What the privacy argument relies on: Opacus' per-sample gradients (with our fast PReLU and
depthwise samplers) are the true per-example gradients, and one example's gradient does not depend
on the rest of the batch."""

from __future__ import annotations

import pytest
import torch
from opacus import GradSampleModule
from train_support import small_faces

from facefed.client.training.dprandom import DPRandom
from facefed.client.training.trainer import _Net, prefix_features
from facefed.common.model.heads import MarginHead
from facefed.common.model.mobilefacenet import build_embedder

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")


def _per_sample(net, x, y, head):
    gsm = GradSampleModule(net, batch_first=True, loss_reduction="sum")
    net.train()
    head.loss(gsm(x), y, reduction="sum").backward()
    params = [p for p in net.parameters() if p.requires_grad]
    out = [p.grad_sample.clone() for p in params]
    gsm._close()
    for p in params:
        p.grad = None
    return params, out


@pytest.mark.parametrize("pretrained, train_from", [(True, "conv_45"), (False, "conv_5")])
def test_per_sample_grads_equal_a_per_example_loop(lfw, pretrained_file, pretrained, train_from):
    torch.manual_seed(0)
    faces = small_faces(lfw, 4, max_per_person=2)
    model = build_embedder(pretrained_file if pretrained else None, train_from=train_from)
    feats = prefix_features(model, faces.images[:5])
    x = feats[:, 1] if pretrained else feats[:, 0]
    y = faces.labels[:5]
    head = MarginHead(faces.pseudonyms)
    net = _Net(model, head)
    params, grads = _per_sample(net, x, y, head)
    kinds = {type(m).__name__ for m in net.modules() if any(p.requires_grad for p in m.parameters(recurse=False))}
    assert {"Conv2d", "PReLU", "Linear"} <= kinds and (pretrained or "GroupNorm" in kinds)
    for i in range(len(x)):
        loss = head.loss(net(x[i : i + 1]), y[i : i + 1], reduction="sum")
        ref = torch.autograd.grad(loss, params)
        for p, g, r in zip(params, grads, ref):
            assert torch.allclose(g[i], r, atol=1e-5, rtol=1e-4), f"param {tuple(p.shape)} sample {i}"


def test_one_example_gradient_ignores_the_rest_of_the_batch(lfw, pretrained_file):
    faces = small_faces(lfw, 6, max_per_person=2)
    model = build_embedder(pretrained_file)
    x = prefix_features(model, faces.images)[:, 0]
    y = faces.labels
    head = MarginHead(faces.pseudonyms)
    net = _Net(model, head)
    _, g1 = _per_sample(net, x[[0, 1, 2]], y[[0, 1, 2]], head)
    _, g2 = _per_sample(net, x[[0, 5, 7, 9]], y[[0, 5, 7, 9]], head)
    for a, b in zip(g1, g2):
        assert torch.allclose(a[0], b[0], atol=1e-6)


@pytest.mark.parametrize("pretrained, train_from", [(True, "conv_5"), (True, "features"), (False, "conv_45")])
def test_ghost_and_hooks_clipping_give_the_exact_clipped_sum(lfw, pretrained_file, pretrained, train_from):
    """DP-SGD's clipped sum, three ways: ghost clipping (our norm samplers + book-keeping sums), Opacus
    hooks (materialised per-sample gradients), and a per-example autograd loop clipped by hand."""
    from facefed.client.training.trainer import _Loop
    from facefed.common.config import TrainConfig

    faces = small_faces(lfw, 6, max_per_person=2)
    model = build_embedder(pretrained_file if pretrained else None, train_from=train_from)
    x = prefix_features(model, faces.images)[:, 0]
    head = MarginHead(faces.pseudonyms)
    y = head.indices(faces.pseudonyms)[faces.labels]
    net = _Net(model, head)
    params = [p for p in net.parameters() if p.requires_grad]
    clip = 0.5 if pretrained else 0.05
    expected = torch.zeros_like(torch.nn.utils.parameters_to_vector(params))
    norms = []
    for i in range(len(x)):
        g = torch.autograd.grad(head.loss(net(x[i : i + 1]), y[i : i + 1], reduction="sum"), params)
        flat = torch.cat([t.flatten() for t in g])
        norms.append(float(flat.norm()))
        expected += flat * min(1.0, clip / (flat.norm() + 1e-6))
    assert max(norms) > clip  # clipping is active
    for mode in ("ghost", "hooks"):
        cfg = TrainConfig(noise_multiplier=0.0, max_grad_norm=clip, clipping=mode, train_from=train_from, momentum=0.0)
        loop = _Loop(net, [{"params": params, "lr": 0.0}], head, cfg, 0.0, len(x), DPRandom.insecure_for_tests(0))
        loop.step(x, y)
        got = torch.cat([p.grad.flatten() for p in params]) * len(x)  # the optimizer divided by E[B]
        loop.close()
        assert torch.allclose(got, expected, atol=1e-5, rtol=1e-4), mode
