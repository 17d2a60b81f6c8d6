"""The embedder: BatchNorm folding, Opacus validity, checkpoints and the shared (federated) state."""

from __future__ import annotations

import pytest
import torch
from opacus.validators import ModuleValidator

from facefed.common.lfw import ImageKey
from facefed.common.model.mobilefacenet import (
    PRETRAINED_PREFIX,
    STAGES,
    CheckpointMismatch,
    MobileFaceNet,
    build_embedder,
    load_checkpoint,
    load_pretrained_state,
    load_shared_state,
    save_checkpoint,
    sha256_file,
    shared_state,
)
from facefed.common.preprocess import decode_faces, to_input


@pytest.fixture(scope="module")
def real_batch(lfw):
    keys = [ImageKey("Aaron_Peirsol", i) for i in (1, 2, 3, 4)] + [ImageKey("Abdullah", i) for i in (1, 2, 3, 4)]
    data = lfw.load_images(keys)
    return to_input(decode_faces([data[k] for k in keys]))


@pytest.fixture(scope="module")
def model(pretrained_file):
    return build_embedder(pretrained_file)


def test_folding_keeps_the_pretrained_function(pretrained_file, model, real_batch):
    raw = torch.load(pretrained_file, map_location="cpu", weights_only=True)
    bn = MobileFaceNet("batch")
    bn.load_state_dict({k[len(PRETRAINED_PREFIX) :]: v for k, v in raw.items()})
    bn.eval()
    with torch.no_grad():
        a, b = bn(real_batch), model(real_batch)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert (a - b).abs().max() < 1e-4
    assert torch.allclose(b.norm(dim=1), torch.ones(len(b)), atol=1e-5) and b.shape == (8, 128)
    # The embedding separates people: same-person cosines beat cross-person ones.
    sim = b @ b.T
    same = sim[:4, :4][~torch.eye(4, dtype=torch.bool)].mean()
    assert same > sim[:4, 4:].mean() + 0.2


def test_opacus_accepts_the_embedder_and_rejects_batchnorm(model):
    # Opacus validates modules in training mode (our layers behave the same in both modes).
    assert ModuleValidator.validate(model.train(), strict=False) == []
    model.eval()
    assert ModuleValidator.validate(build_embedder(None).train(), strict=False) == []  # scratch: GroupNorm
    errors = ModuleValidator.validate(MobileFaceNet("batch").train(), strict=False)
    assert errors and "BatchNorm" in str(errors[0])  # the raw layout is not valid


def test_prefix_then_tail_is_the_forward(model, real_batch):
    for stage in ("conv_45", "conv_5", "features"):
        model.train_from = stage
        with torch.no_grad():
            assert torch.allclose(model.forward_tail(model.forward_prefix(real_batch)), model(real_batch), atol=1e-6)
    model.train_from = "conv_5"
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(model.tail_param_names()) and all(
        n.split(".")[0] in STAGES[7:] + ("sep", "prelu") for n in trainable
    )
    model.train_from = "features"  # the default for a pretrained model
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"features.weight", "features.bias"}


def test_checkpoint_roundtrip(tmp_path, model):
    path = tmp_path / "m.ckpt"
    digest = save_checkpoint(path, model, {"round": 3, "epsilon": 1.5})
    assert digest == sha256_file(path)
    assert [p.name for p in tmp_path.iterdir()] == ["m.ckpt"]  # the temp file was renamed away
    loaded, meta = load_checkpoint(path)
    assert meta == {"round": 3, "epsilon": 1.5} and loaded.train_from == model.train_from
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k])


def test_raw_pretrained_is_accepted_as_a_checkpoint(pretrained_file, model):
    loaded, meta = load_checkpoint(pretrained_file)
    assert meta["source"] == "pretrained" and meta["sha256"] == sha256_file(pretrained_file)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())


def test_bad_checkpoints_name_the_first_mismatch(tmp_path, pretrained_file, model):
    raw = torch.load(pretrained_file, map_location="cpu", weights_only=True)
    bad = dict(raw)
    bad["arcface.conv_4.model.2.conv.conv.weight"] = torch.zeros(256, 64, 1, 1)
    torch.save(bad, tmp_path / "shape.pth")
    with pytest.raises(CheckpointMismatch, match=r"`conv_4\.model\.2\.conv\.conv\.weight` has shape \(256, 64, 1, 1\)"):
        load_pretrained_state(tmp_path / "shape.pth")
    missing = {k: v for k, v in raw.items() if k != "arcface.GDC_bn.running_var"}
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(CheckpointMismatch, match=r"missing key `GDC_bn\.running_var`"):
        build_embedder(tmp_path / "missing.pth")
    path = tmp_path / "m.ckpt"
    save_checkpoint(path, model, {})
    payload = torch.load(path, weights_only=True)
    payload["state_dict"]["extra.weight"] = torch.zeros(1)
    torch.save(payload, path)
    with pytest.raises(CheckpointMismatch, match=r"unexpected key `extra\.weight`"):
        load_checkpoint(path)
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointMismatch, match="junk.ckpt"):
        load_checkpoint(tmp_path / "junk.ckpt")


def test_shared_state_is_the_tail_only(pretrained_file):
    a, b = build_embedder(pretrained_file, train_from="conv_5"), build_embedder(pretrained_file, train_from="conv_5")
    state = shared_state(a)
    assert set(state) == set(a.tail_param_names()) and "conv1.conv.weight" not in state
    assert sum(v.numel() for v in state.values()) < sum(p.numel() for p in a.parameters()) / 2
    state = {k: v + 0.01 for k, v in state.items()}
    load_shared_state(b, state)
    assert all(torch.equal(v, shared_state(b)[k]) for k, v in state.items())
    assert torch.equal(a.conv1.conv.weight, b.conv1.conv.weight)
    with pytest.raises(CheckpointMismatch, match=r"missing key `conv_5\.model\.0\.conv\.conv\.weight`"):
        load_shared_state(b, {k: v for k, v in state.items() if k != "conv_5.model.0.conv.conv.weight"})
    with pytest.raises(CheckpointMismatch, match=r"`features\.weight` has shape"):
        load_shared_state(b, {**state, "features.weight": torch.zeros(3)})
    with pytest.raises(CheckpointMismatch, match=r"`conv1\.conv\.weight` is frozen"):
        load_shared_state(b, {**state, "conv1.conv.weight": a.conv1.conv.weight.detach()})
