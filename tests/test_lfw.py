"""The LFW reader against the real archive and an extracted copy of part of it."""

from __future__ import annotations

import tarfile

import pytest

from facefed.common.lfw import LFW, ImageKey, LFWFormatError, parse_pairs, parse_people, partition_people


def test_archive_listing_and_protocol(lfw):
    counts = lfw.counts()
    assert len(counts) == 5749 and sum(counts.values()) == 13233
    assert len(lfw.people("peopleDevTrain.txt")) == 4038
    assert len(lfw.people("peopleDevTest.txt")) == 1711
    view2 = lfw.pairs("pairs.txt")
    assert len(view2) == 10 and all(len(f) == 600 for f in view2)
    assert sum(p.same for f in view2 for p in f) == 3000
    dev_test = lfw.pairs("pairsDevTest.txt")
    assert len(dev_test) == 1 and len(dev_test[0]) == 1000
    # Every pair refers to an image that exists.
    for fold in view2 + dev_test:
        for p in fold:
            for k in (p.a, p.b):
                assert 1 <= k.index <= counts[k.name]


def test_view1_people_are_disjoint(lfw):
    assert not set(lfw.people("peopleDevTrain.txt")) & set(lfw.people("peopleDevTest.txt"))
    train = set(lfw.people("peopleDevTrain.txt"))
    for p in lfw.pairs("pairsDevTest.txt")[0]:
        assert p.a.name not in train and p.b.name not in train


def test_tree_and_archive_read_the_same_bytes(lfw, lfw_file, tmp_path):
    names = ["Aaron_Peirsol", "Zoran_Djindjic"]
    with tarfile.open(lfw_file) as tar:
        members = [m for m in tar if any(f"/{n}/" in m.name for n in names) or m.name.endswith("pairsDevTest.txt")]
        tar.extractall(tmp_path, members=members, filter="data")
    tree = LFW(tmp_path)
    assert set(tree.counts()) == set(names)
    keys = [k for n in names for k in tree.keys(n)]
    assert tree.load_images(keys) == lfw.load_images(keys)
    assert tree.pairs("pairsDevTest.txt") == lfw.pairs("pairsDevTest.txt")
    assert tree.read_image(ImageKey("Aaron_Peirsol", 1))[:2] == b"\xff\xd8"  # JPEG magic


def test_partition_is_deterministic_disjoint_and_complete(lfw):
    people = lfw.people("peopleDevTrain.txt")
    a = partition_people(people, 3)
    assert a == partition_people(people, 3)
    assert sorted(sum(a, [])) == sorted(people)
    assert max(map(len, a)) - min(map(len, a)) <= 1
    assert partition_people(people, 3, seed="other") != a


@pytest.mark.parametrize(
    "text,msg",
    [
        ("", "empty"),
        ("2\nA_B\t1\t2\n", "promises"),
        ("1\nA_B\t1\nC\t1\tD\t1\n", "expected"),
        ("1\nA_B\tx\t2\nA_B\t1\tC_D\t2\n", "integer"),
        ("1\nA_B\t1\tC_D\t2\nA_B\t1\t2\n", "matched then"),
    ],
)
def test_malformed_pairs_are_named(text, msg):
    with pytest.raises(LFWFormatError, match=msg):
        parse_pairs(text)


def test_people_formats():
    assert parse_people("2\nA_B\t3\nC\t1\n") == [[("A_B", 3), ("C", 1)]]
    assert parse_people("2\n1\nA\t1\n1\nB\t2\n") == [[("A", 1)], [("B", 2)]]
    with pytest.raises(LFWFormatError, match="trailing"):
        parse_people("1\nA\t1\nB\t2\n")
    with pytest.raises(LFWFormatError, match="person name"):
        parse_people("1\n../etc\t1\n")


def test_missing_archive_says_where_to_put_it(tmp_path):
    from facefed.common.paths import DataNotFound

    with pytest.raises(DataNotFound, match="FACEFED_LFW"):
        LFW(tmp_path / "nope.tgz")
