"""The embedder people use (`facefed.load`, `facefed-client embed/compare`) on real LFW photos and a
checkpoint written by the server's real round path (common/embedder.py, common/calibration.py)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from federation_support import LocalGrid, shifted_site
from PIL import Image

import facefed
from facefed.common.calibration import NoThreshold
from facefed.common.config import validate_config
from facefed.common.faces import NoFace, SeveralFaces
from facefed.common.faces.align import encode_canonical
from facefed.common.faces.lfw import align_public
from facefed.common.fedconfig import FederationConfig
from facefed.common.lfw import ImageKey
from facefed.common.model.mobilefacenet import sha256_file
from facefed.server.app import Coordinator, Evaluator
from facefed.server.ledger.db import Ledger
from facefed.server.ops.submission import Submission
from facefed.server.state import StatePaths

# pairsDevTest people (disjoint from pairsDevTrain, where the threshold is picked), 2 images each.
PEOPLE = ["Colin_Powell", "Tony_Blair", "Donald_Rumsfeld", "Gerhard_Schroeder", "Ariel_Sharon"]
RAW = [ImageKey("George_W_Bush", 1), ImageKey("George_W_Bush", 2), ImageKey("Colin_Powell", 1)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, pretrained_file, lfw_file):
    """One real federated round (LocalGrid sites that send the tail back unchanged), evaluated with a
    real Evaluator: the checkpoint the server writes, threshold and provenance included."""
    state = StatePaths.at(tmp_path_factory.mktemp("server") / "state", create=True)
    train = {"privacy_unit": "person", "delta": 1e-5, "noise_multiplier": 1.0, "sample_rate": 0.5, "steps": 2}
    cfg = validate_config(
        {
            "rounds": 1,
            "min_sites": 2,
            "round_timeout_s": 5.0,
            "wait_for_sites_s": 0.0,
            "max_round_attempts": 1,
            "evaluate": {"every": 1, "max_pairs": 200},
            "train": train,
        },
        FederationConfig,
    )
    grid = LocalGrid({1: ("", shifted_site("alpha", 0.0, people=2)), 2: ("", shifted_site("beta", 0.0, people=3))})
    sub = Submission(
        name="sub-t", run_id="emb-run", resume=False, config=cfg, lfw=None, pretrained=str(pretrained_file)
    )
    evaluator = Evaluator(str(lfw_file), "pairsDevTest.txt", max_pairs=200)
    Coordinator(grid, state, sub, evaluator=evaluator, log=lambda _m: None).run()
    with Ledger(state.ledger) as ledger:
        (r,) = ledger.rounds("emb-run")
        return ledger.checkpoint(r.checkpoint_id)


@pytest.fixture(scope="module")
def model(checkpoint):
    return facefed.load(checkpoint.path, device="cpu")


@pytest.fixture(scope="module")
def crops(lfw) -> dict[str, list[bytes]]:
    """Two canonical 224 crops (JPEG bytes, as the vault stores them) per person."""
    keys = [ImageKey(p, i) for p in PEOPLE for i in (1, 2)]
    out: dict[str, list[bytes]] = {}
    for key, _image, crop in align_public(lfw.load_images(keys).items(), margin=56):
        assert crop is not None, key
        out.setdefault(key.name, []).append(encode_canonical(crop))
    return out


@pytest.fixture(scope="module")
def photos(lfw, tmp_path_factory):
    """Raw LFW photos on disk (one face each), made at test time."""
    d = tmp_path_factory.mktemp("photos")
    paths = []
    for key, data in sorted(lfw.load_images(RAW).items()):
        p = d / f"{key.name}_{key.index:04d}.jpg"
        p.write_bytes(data)
        paths.append(p)
    return paths  # Colin_Powell_1, George_W_Bush_1, George_W_Bush_2


def test_import_facefed_does_not_import_torch():
    code = (
        "import sys, facefed; assert 'torch' not in sys.modules, 'torch imported'; "
        "assert callable(facefed.load) and 'torch' in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env=dict(os.environ))


def test_server_checkpoint_carries_threshold_preprocessing_and_provenance(model, checkpoint, pretrained_file):
    t = model.threshold
    assert t is not None and t.far == pytest.approx(1e-3)
    assert "pairsDevTrain.txt" in t.validation and t.n_pairs == 200 and t.n_impostor == 100
    assert t.impostors_accepted == 0 and -1 < t.threshold < 1 and 0 < (t.tar or 0) <= 1
    assert model.preprocessing["layout"] == "aligned-112 from canonical-224"
    assert model.preprocessing["aligner"] == "dlib-hog1-mmod320-sp5-v2" and model.preprocessing["flip_average"] is True
    p = model.provenance
    assert (p["run_id"], p["round"], p["facefed_version"]) == ("emb-run", 1, facefed.__version__)
    assert p["base_sha256"] == sha256_file(pretrained_file) and len(p["parent_sha256"]) == 64
    assert set(p["sites"]) == {"alpha", "beta"}
    assert p["sites"]["beta"] == {"epsilon": pytest.approx(0.5), "delta": pytest.approx(1e-5), "unit": "person"}
    # The ledger shows the threshold with the round's metrics.
    assert model.meta["threshold"]["threshold"] == t.threshold


def test_embeddings_are_unit_flip_averaged_and_layout_aware(model, crops):
    canonical = crops["Tony_Blair"][0]
    e = model.embed([canonical, Image.open(io.BytesIO(canonical)).crop((56, 56, 168, 168))])
    assert e.shape == (2, 128) and e.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
    assert float(e[0] @ e[1]) > 0.995  # the 224 crop and its centre 112 face are the same input (JPEG aside)
    assert model.embed(canonical).shape == (1, 128)


def test_same_person_above_and_different_people_below_the_stored_threshold(model, crops):
    same = [model.compare(crops[p][0], crops[p][1]) for p in PEOPLE]
    diff = [model.compare(crops[a][0], crops[b][1]) for a in PEOPLE for b in PEOPLE if a != b]
    assert min(c.cosine for c in same) > max(c.cosine for c in diff)
    assert all(c.same for c in same)
    # The test calibrates on only 100 impostor pairs (max_pairs=200 keeps it cheap), so its "FAR 1e-3"
    # threshold is the highest of 100 impostor scores, about FAR 1e-2: one impostor in 20 may pass.
    assert sum(c.same for c in diff) <= 1
    assert all(c.threshold == model.threshold.threshold and c.far == pytest.approx(1e-3) for c in same + diff)


def test_identify_finds_the_person_in_a_small_gallery(model, crops):
    gallery = {p: crops[p][0] for p in PEOPLE[:4]}
    for p in PEOPLE[:4]:
        match = model.identify(crops[p][1], gallery)
        assert match is not None and match.name == p, (p, match)
        assert match.cosine == max(match.scores.values()) > match.threshold
    assert model.identify(crops[PEOPLE[4]][1], gallery) is None  # not enrolled: no one above the threshold
    # Precomputed embeddings give the same answer.
    pre = model.embed_gallery(gallery)
    assert model.identify(crops["Tony_Blair"][1], pre).name == "Tony_Blair"


def test_raw_photos_are_detected_and_refused_unless_one_face(model, photos, tmp_path):
    powell, bush1, bush2 = photos
    assert model.compare(bush1, bush2).cosine > model.compare(bush1, powell).cosine
    blank = tmp_path / "blank.jpg"
    Image.new("RGB", (300, 300), (128, 128, 128)).save(blank)
    with pytest.raises(NoFace, match="blank.jpg: no face"):
        model.embed([bush1, blank])
    two = Image.new("RGB", (500, 250))
    two.paste(Image.open(bush1), (0, 0))
    two.paste(Image.open(powell), (250, 0))
    with pytest.raises(SeveralFaces, match="2 faces"):
        model.embed(two)


def test_no_threshold_is_a_one_line_error_naming_the_fix(pretrained_file, crops):
    m = facefed.load(pretrained_file, device="cpu")
    assert m.threshold is None and m.embed(crops["Tony_Blair"][0]).shape == (1, 128)
    with pytest.raises(NoThreshold, match="pass threshold=") as e:
        m.compare(crops["Tony_Blair"][0], crops["Tony_Blair"][1])
    assert "\n" not in str(e.value)
    given = facefed.load(pretrained_file, device="cpu", threshold=0.3)
    c = given.compare(crops["Tony_Blair"][0], crops["Tony_Blair"][1])
    assert c.threshold == 0.3 and c.far is None


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "facefed.client.cli.main", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ),
    )


def test_cli_embed_and_compare(checkpoint, photos, pretrained_file, tmp_path):
    powell, bush1, bush2 = photos
    r = _cli("embed", bush1, powell, "--model", checkpoint.path, "--json", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["dim"] == 128 and [e["image"] for e in doc["embeddings"]] == [str(bush1), str(powell)]
    assert all(abs(np.linalg.norm(e["embedding"]) - 1) < 1e-4 for e in doc["embeddings"])

    r = _cli("compare", bush1, bush2, "--model", checkpoint.path, "--json")
    assert r.returncode == 0, r.stderr
    same = json.loads(r.stdout)
    assert same["same"] is True and same["cosine"] > same["threshold"] and same["far"] == pytest.approx(1e-3)
    r = _cli("compare", bush1, powell, "--model", checkpoint.path)
    assert r.returncode == 0 and "different people" in r.stdout and "FAR 0.001" in r.stdout

    # The pretrained weights need --threshold; without it: exit 2, one line naming the fix.
    r = _cli("compare", bush1, powell, "--model", pretrained_file)
    assert r.returncode == 2 and "--threshold" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = _cli("compare", bush1, bush2, "--model", pretrained_file, "--threshold", "0.3", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["same"] is True

    blank = tmp_path / "blank.jpg"
    Image.new("RGB", (300, 300), (128, 128, 128)).save(blank)
    r = _cli("embed", blank, "--model", checkpoint.path)
    assert r.returncode == 2 and f"{blank}: no face" in r.stderr
    r = _cli("embed", tmp_path / "missing.jpg", "--model", checkpoint.path)
    assert r.returncode == 2 and "no such image file" in r.stderr


def test_device_auto_cpu_cuda(pretrained_file):
    import torch

    from facefed.common.device import DeviceUnavailable, resolve_device

    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu").type == "cpu"
    with pytest.raises(DeviceUnavailable, match="auto, cpu or cuda"):
        facefed.load(pretrained_file, device="gpu")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceUnavailable, match="use --device cpu"):
            resolve_device("cuda")
