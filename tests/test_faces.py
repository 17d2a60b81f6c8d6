"""Detection + 5-point alignment on real LFW faces, enrolment of raw photos, and what the vault stores."""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from photo_support import jpeg, raw_photo
from PIL import Image
from typer.testing import CliRunner
from vault_support import make_stores

from facefed.client.cli.vault import app
from facefed.client.vault import Vault
from facefed.client.vault.errors import InvalidImage
from facefed.common.evaluate import EvalCache
from facefed.common.faces import (
    CANONICAL_CENTRE,
    CANONICAL_MARGIN,
    CANONICAL_SIZE,
    FaceTooSmall,
    NoFace,
    SeveralFaces,
    align,
    canonical_crop,
    detect,
    enrolment_crop,
    pick_central,
    similarity_transform,
    single_face,
    template,
)
from facefed.common.lfw import ImageKey
from facefed.common.model.mobilefacenet import build_embedder
from facefed.common.preprocess import BadImage, FixedCropFallback, decode_face, to_input

A = [ImageKey("Aaron_Peirsol", i) for i in (1, 2, 3)]
B = [ImageKey("Abdullah_Gul", i) for i in (1, 2)]


@pytest.fixture(scope="module")
def photos(lfw) -> dict[ImageKey, Image.Image]:
    data = lfw.load_images(A + B)
    return {k: Image.open(io.BytesIO(v)).convert("RGB") for k, v in data.items()}


@pytest.fixture(scope="module")
def model(pretrained_file):
    return build_embedder(pretrained_file).eval()


def embed(model, faces: list[Image.Image]) -> torch.Tensor:
    x = torch.stack([torch.from_numpy(np.asarray(f, np.uint8).copy()).permute(2, 0, 1) for f in faces])
    with torch.no_grad():
        return F.normalize(model(to_input(x)) + model(to_input(x, flip=True)), dim=1)


def test_alignment_puts_the_landmarks_on_the_template(photos):
    img = photos[A[0]]
    face = single_face(img, what="a")
    crop = canonical_crop(img, face.landmarks)
    assert crop.size == (CANONICAL_SIZE, CANONICAL_SIZE)
    # the detected landmarks map onto the template exactly (the warp is that similarity) ...
    m = similarity_transform(face.landmarks, template(margin=CANONICAL_MARGIN))
    mapped = face.landmarks @ m[:, :2].T + m[:, 2]
    assert np.abs(mapped - template(margin=CANONICAL_MARGIN)).max() < 1.0
    # ... and detecting again in the warped crop finds the face where the template says (a few px)
    again = pick_central(detect(crop), crop.size)
    assert again is not None
    assert np.abs(again.landmarks - template(margin=CANONICAL_MARGIN)).max() < 4.0
    # a rotated, scaled copy of the image aligns to the same crop, within a few pixels
    photo = raw_photo(img, angle=20, scale=1.5, at=(150, 60))
    f2 = single_face(photo, what="photo")
    again2 = pick_central(detect(canonical_crop(photo, f2.landmarks)), (CANONICAL_SIZE, CANONICAL_SIZE))
    assert again2 is not None and np.abs(again2.landmarks - template(margin=CANONICAL_MARGIN)).max() < 4.0
    # the model's input is the centre of the canonical crop, with no second resampling
    assert np.array_equal(np.asarray(crop.crop(CANONICAL_CENTRE)), np.asarray(align(img, face.landmarks)))


def test_a_raw_photo_enrols_and_its_crop_matches_the_person(photos, model, tmp_path):
    photo = raw_photo(photos[A[0]], angle=-15, scale=1.6, at=(230, 50))
    path = tmp_path / "holiday.jpg"
    path.write_bytes(jpeg(photo))
    stores = make_stores(tmp_path / "s", 3)
    runner = CliRunner()
    vault = tmp_path / "vault"
    assert runner.invoke(app, ["init", "--vault", str(vault), "--stores", ",".join(stores)]).exit_code == 0
    r = runner.invoke(app, ["add", "--vault", str(vault), "--person", "aaron", str(path)])
    assert r.exit_code == 0, r.output
    with Vault.open(vault) as v:
        (iid,) = v.image_ids("aaron")
        stored = v.get(iid)
    crop = Image.open(io.BytesIO(stored))
    assert crop.format == "JPEG" and crop.size == (CANONICAL_SIZE, CANONICAL_SIZE)  # no background kept
    model_input = decode_face(stored)  # the centre 112x112
    e = F.normalize(model(to_input(model_input[None])) + model(to_input(model_input[None], flip=True)), dim=1).detach()
    same = embed(model, [align(photos[k], single_face(photos[k], what=str(k)).landmarks) for k in A])
    other = embed(model, [align(photos[k], single_face(photos[k], what=str(k)).landmarks) for k in B])
    s_same, s_other = (e @ same.T).squeeze(0), (e @ other.T).squeeze(0)
    assert float(s_same[0]) > 0.8  # the very image it was made from
    assert float(s_same[1:].min()) > float(s_other.max()) + 0.2, (s_same, s_other)


def test_no_face_several_faces_and_tiny_faces_are_refused(photos, tmp_path):
    noise = Image.fromarray(np.random.default_rng(1).integers(0, 256, (480, 640, 3), dtype=np.uint8))
    blank = Image.new("RGB", (640, 480), (200, 200, 200))
    for name, img in (("noise.png", noise), ("blank.jpg", blank)):
        where = str(tmp_path / name)
        with pytest.raises(NoFace, match="no face found") as e:
            enrolment_crop(jpeg(img), what=where)
        assert where in str(e.value)
    two = Image.new("RGB", (520, 260), (128, 128, 128))
    two.paste(photos[A[0]], (0, 5))
    two.paste(photos[B[0]], (265, 5))
    with pytest.raises(SeveralFaces, match="2 faces found"):
        single_face(two, what="two.jpg")
    small = Image.new("RGB", (640, 480), (128, 128, 128))
    small.paste(photos[A[0]].resize((100, 100), Image.Resampling.BOX), (270, 190))
    with pytest.raises(FaceTooSmall, match="too small"):
        single_face(small, what="small.jpg")


def test_vault_add_of_a_photo_without_a_face_exits_2_naming_the_full_path(tmp_path, monkeypatch):
    stores = make_stores(tmp_path / "s", 3)
    runner = CliRunner()
    vault = tmp_path / "vault"
    assert runner.invoke(app, ["init", "--vault", str(vault), "--stores", ",".join(stores)]).exit_code == 0
    (tmp_path / "wall.jpg").write_bytes(jpeg(Image.new("RGB", (640, 480), (90, 140, 90))))
    monkeypatch.chdir(tmp_path)  # a relative argument: the message still names the full path
    r = runner.invoke(app, ["add", "--vault", str(vault), "--person", "p", "wall.jpg"])
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "no face found" in lines[0] and str(tmp_path / "wall.jpg") in lines[0]
    with Vault.open(vault) as v:
        assert v.people() == []


def test_layouts_the_model_and_the_vault_accept(photos, tmp_path):
    img = photos[A[0]]
    crop = canonical_crop(img, single_face(img, what="a").landmarks)
    png = io.BytesIO()
    crop.save(png, "PNG")
    x = decode_face(png.getvalue())
    assert torch.equal(x, torch.from_numpy(np.asarray(crop.crop(CANONICAL_CENTRE)).copy()).permute(2, 0, 1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        decode_face(jpeg(img))  # a 250x250 LFW frame: only through the named fallback, reported
    assert any(issubclass(w.category, FixedCropFallback) for w in caught)
    raw = jpeg(raw_photo(img, angle=0, scale=1.0, at=(0, 0)))
    with pytest.raises(BadImage, match="640x480 is not an aligned face"):
        decode_face(raw)
    stores = make_stores(tmp_path / "s", 3)
    with Vault.create(tmp_path / "v", stores, 2) as v, pytest.raises(InvalidImage, match="not an aligned face"):
        v.put("p", raw)  # nothing enters the vault that training would refuse


def test_aligned_beats_the_fixed_crop_on_lfw_pairs(lfw, model):
    results = {
        p: EvalCache(lfw, "pairsDevTest.txt", max_pairs=200, preprocess=p).evaluate(model)
        for p in ("fixed-crop", "aligned")
    }
    fixed, aligned = results["fixed-crop"], results["aligned"]
    assert aligned.preprocess == "aligned" and fixed.preprocess == "fixed-crop"
    assert aligned.accuracy_mean > fixed.accuracy_mean and aligned.auc > fixed.auc, (aligned.summary(), fixed.summary())
    assert aligned.accuracy_mean >= 0.97


def test_lfw_import_aligns_and_stores_canonical_crops(lfw_file, tmp_path):
    stores = make_stores(tmp_path / "s", 3)
    runner = CliRunner()
    vault = tmp_path / "vault"
    assert runner.invoke(app, ["init", "--vault", str(vault), "--stores", ",".join(stores)]).exit_code == 0
    args = ["import", "--vault", str(vault), "--lfw", str(lfw_file), "--max-people", "3", "--num-sites", "3"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "aligned:" in r.stdout
    with Vault.open(vault) as v:
        sizes = {
            Image.open(io.BytesIO(data)).size
            for _, _, data in v.iter_images([i for p in v.people() for i in v.image_ids(p.person_id)])
        }
    assert sizes == {(CANONICAL_SIZE, CANONICAL_SIZE)}
    again = runner.invoke(app, args)  # resumable: everything is already stored, nothing is detected again
    assert again.exit_code == 0 and "0 detected" in again.stdout, again.output


def test_training_from_lfw_is_aligned_like_the_vault_and_skips_images_with_no_face(lfw, monkeypatch):
    """faces_from_lfw (benchmarks, simulated sites): the canonical crop's centre, never the fixed crop;
    an image with no detection is left out and listed."""
    from facefed.client.training.faces import faces_from_lfw

    with warnings.catch_warnings():
        warnings.simplefilter("error", FixedCropFallback)
        faces = faces_from_lfw(lfw, ["Aaron_Peirsol", "Arlen_Specter"], max_per_person=3)
        assert faces.skipped == [] and faces.counts.tolist() == [3, 3]  # the CNN stage finds the turned face
        monkeypatch.setenv("FACEFED_ALIGNER", "dlib-hog")
        faces = faces_from_lfw(lfw, ["Aaron_Peirsol", "Arlen_Specter"], max_per_person=3)
    assert faces.skipped == ["Arlen_Specter/Arlen_Specter_0003.jpg"]  # a frontal-detector miss
    assert faces.counts.tolist() == [3, 2] and faces.n_images == 5
    img = Image.open(io.BytesIO(lfw.load_images([A[0]])[A[0]])).convert("RGB")
    crop = canonical_crop(img, pick_central(detect(img), img.size).landmarks)
    expected = torch.from_numpy(np.asarray(crop.crop(CANONICAL_CENTRE)).copy()).permute(2, 0, 1)
    assert (faces.images[0].float() - expected.float()).abs().mean() < 2.0  # the same crop, after JPEG q95


def test_the_cnn_stage_finds_turned_faces_that_hog_misses_and_aligns_them(lfw, model, tmp_path, monkeypatch):
    """Three View 2 images where dlib's frontal HOG detector finds no face (turned heads): HOG alone
    falls back to the fixed crop; `dlib` (HOG, then the MMOD CNN) finds each face, and its aligned
    crop matches the person's own other photo far above the other two people."""
    misses = [ImageKey("Abdoulaye_Wade", 3), ImageKey("Jane_Fonda", 2), ImageKey("Saeb_Erekat", 2)]
    others = [ImageKey("Abdoulaye_Wade", 1), ImageKey("Jane_Fonda", 1), ImageKey("Saeb_Erekat", 1)]
    data = lfw.load_images(misses + others)
    img = {k: Image.open(io.BytesIO(v)).convert("RGB") for k, v in data.items()}
    aligned = []
    for k in misses:
        assert pick_central(detect(img[k], backend="dlib-hog"), img[k].size) is None, k
        face = pick_central(detect(img[k], backend="dlib"), img[k].size)
        assert face is not None and face.size >= 56, k
        aligned.append(align(img[k], face.landmarks))
    sims = (
        embed(model, aligned)
        @ embed(model, [align(img[k], single_face(img[k], what=str(k)).landmarks) for k in others]).T
    )
    for i in range(3):
        rest = torch.cat([sims[i, :i], sims[i, i + 1 :]])
        assert float(sims[i, i]) > float(rest.max()) + 0.15, sims

    # The landmarks cache of public images: `dlib` reuses HOG-only entries where HOG found a face and
    # detects only the rest.
    from facefed.common.faces.lfw import AlignReport, align_public

    monkeypatch.setenv("FACEFED_CACHE", str(tmp_path / "cache"))
    items = [(k, data[k]) for k in (misses[0], others[0])]
    hog_only, both = AlignReport(), AlignReport()
    assert [c is None for _, _, c in align_public(items, backend="dlib-hog", report=hog_only)] == [True, False]
    assert [c is None for _, _, c in align_public(items, backend="dlib", report=both)] == [False, False]
    assert (hog_only.detected, both.detected, both.cached, both.no_face) == (2, 1, 1, [])
