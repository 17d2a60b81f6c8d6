"""The CosFace head: data-independent rows keyed by pseudonym, removal, persistence, the margin."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from facefed.common.model.heads import HeadError, MarginHead


def test_rows_depend_only_on_seed_and_pseudonym():
    a = MarginHead(["p1", "p2", "p3"], seed=7)
    b = MarginHead(["p9", "p3"], seed=7)
    assert torch.equal(a.fc.weight[a.index("p3")], b.fc.weight[b.index("p3")])
    assert not torch.equal(a.fc.weight[a.index("p3")], MarginHead(["p3"], seed=8).fc.weight[0])
    assert torch.allclose(a.fc.weight.norm(dim=1), torch.ones(3))
    assert a.add_people(["p2", "p4"]) == ["p4"] and len(a) == 4


def test_remove_deletes_the_row_and_keeps_the_others():
    h = MarginHead(["a", "b", "c"])
    with torch.no_grad():
        h.fc.weight.mul_(2)
    keep = {p: h.fc.weight[h.index(p)].clone() for p in ("a", "c")}
    assert h.remove_people(["b", "zz"]) == ["b"]
    assert h.ids == ["a", "c"] and h.fc.weight.shape == (2, 128)
    assert all(torch.equal(h.fc.weight[h.index(p)], v) for p, v in keep.items())
    with pytest.raises(HeadError, match="'b' has no row"):
        h.index("b")
    with pytest.raises(HeadError, match="not a pseudonym"):
        h.add_people(["../etc"])


def test_save_and_load(tmp_path):
    h = MarginHead(["a", "b"], scale=30.0, margin=0.3, seed=3)
    h.probed = True
    h.save(tmp_path / "head.pt")
    g = MarginHead.load(tmp_path / "head.pt")
    assert g.ids == h.ids and torch.equal(g.fc.weight, h.fc.weight) and g.probed
    assert (g.scale, g.margin, g.seed) == (30.0, 0.3, 3)
    state = h.state()
    state["weight"] = torch.zeros(3, 128)
    with pytest.raises(HeadError, match=r"shape \(3, 128\), expected \(2, 128\)"):
        MarginHead.from_state(state)


def test_cosface_loss():
    h = MarginHead(["a", "b", "c"], scale=10.0, margin=0.4)
    emb = torch.randn(5, 128)
    labels = torch.tensor([0, 1, 2, 0, 1])
    logits = h(emb)
    cos = F.normalize(emb, dim=1) @ F.normalize(h.fc.weight, dim=1).T
    assert torch.allclose(logits, 10 * cos, atol=1e-5)
    expected = sum(-torch.log_softmax(10 * (cos[i] - 0.4 * F.one_hot(labels[i], 3)), 0)[labels[i]] for i in range(5))
    assert torch.allclose(h.loss(logits, labels), expected, atol=1e-4)
    assert h.loss(logits, labels) > F.cross_entropy(logits, labels, reduction="sum")  # the margin costs
