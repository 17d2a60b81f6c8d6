"""`facefed-client train` as a real process on a small real vault: checkpoint, epsilon, budget refusal."""

from __future__ import annotations

import os
import subprocess
import sys

from train_support import make_vault

from facefed.client.training.privacy import Policy, write_policy
from facefed.common.model.mobilefacenet import load_checkpoint, sha256_file

CONFIG = """
privacy_unit = "person"
delta = 1e-3
max_epsilon = 30.0
noise_multiplier = 1.0
sample_rate = 0.5
probe_steps = 3
steps = 4
"""


def _train(vault, config, out, env):
    cmd = [
        sys.executable,
        "-m",
        "facefed.client.cli.main",
        "train",
        "--vault",
        str(vault),
        "--config",
        str(config),
        "--out",
        str(out),
    ]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def test_train_command(lfw, pretrained_file, tmp_path):
    vault, names = make_vault(tmp_path, lfw, 10, max_per_person=3)
    write_policy(vault, Policy(delta=1e-3, max_epsilon=30.0))  # the site's policy allows this config
    env = {**os.environ, "FACEFED_PRETRAINED": str(pretrained_file), "COLUMNS": "200"}
    config = tmp_path / "train.toml"
    config.write_text(CONFIG)
    out = tmp_path / "out" / "model.ckpt"
    r = _train(vault, config, out, env)
    assert r.returncode == 0, r.stderr + r.stdout
    assert "per person" in r.stdout and "RDP" in r.stdout and sha256_file(out) in r.stdout
    model, meta = load_checkpoint(out)
    assert meta["privacy_unit"] == "person" and meta["steps"] == 7 and meta["people"] == 10
    assert 0 < meta["epsilon"] < 30 and meta["delta"] == 1e-3 and meta["accountant"] == "rdp"
    # The head in the train state; the accountant is the vault's own (shared with the federation node).
    assert (vault / "train-state" / "head.pt").exists() and (vault / "accountant.json").exists()
    assert not (vault / "train-state" / "accountant.json").exists()
    # The budget carries over between runs: a run that would pass it is refused, nothing written.
    config.write_text(CONFIG.replace("steps = 4", "steps = 400"))
    before = (vault / "accountant.json").read_bytes()
    r = _train(vault, config, tmp_path / "second.ckpt", env)
    assert r.returncode == 2 and "refused (budget)" in r.stderr and "privacy budget exceeded" in r.stderr
    assert "remaining" in r.stderr and not (tmp_path / "second.ckpt").exists()
    assert (vault / "accountant.json").read_bytes() == before
    # A config asking for less privacy than the policy allows is refused before anything runs.
    config.write_text(CONFIG.replace("noise_multiplier = 1.0", "noise_multiplier = 0.05"))
    r = _train(vault, config, tmp_path / "weak.ckpt", env)
    assert r.returncode == 2 and "refused (policy): noise_multiplier: order asks 0.05" in r.stderr
    assert (vault / "accountant.json").read_bytes() == before
    # A config typo names the key.
    config.write_text(CONFIG + "learning_rate = 1\n")
    r = _train(vault, config, tmp_path / "third.ckpt", env)
    assert r.returncode == 2 and "key `learning_rate`: unknown key" in r.stderr


def test_forget_after_local_train_leaves_no_trace_at_the_site(lfw, pretrained_file, tmp_path):
    """Issue 11: `train` keeps VAULT/train-state/head.pt with every pseudonym, and a node state elsewhere;
    forget scrubs all of them. A byte scan of every file under the vault, its state directories and its
    stores finds neither the person id nor the pseudonym, except the request's own record."""
    from demo.federation import files_mentioning
    from facefed.client.vault import Vault

    vault, names = make_vault(tmp_path, lfw, 10, max_per_person=3)
    write_policy(vault, Policy(delta=1e-3, max_epsilon=30.0))
    env = {**os.environ, "FACEFED_PRETRAINED": str(pretrained_file), "COLUMNS": "200"}
    config = tmp_path / "train.toml"
    config.write_text(CONFIG)
    elsewhere = tmp_path / "other-state"  # a second `train` state directory, away from the vault
    for extra in ([], ["--state", str(elsewhere)]):
        r = subprocess.run(
            [sys.executable, "-m", "facefed.client.cli.main", "train", "--vault", str(vault), "--config", str(config)]
            + ["--out", str(tmp_path / f"m{len(extra)}.ckpt"), *extra],
            capture_output=True,
            text=True,
            env=env,
            timeout=600,
        )
        assert r.returncode == 0, r.stderr
    person = names[3]
    with Vault.open(vault) as v:
        pseudonym = v.person(person).pseudonym
    assert "train-state/head.pt" in files_mentioning(vault, pseudonym)  # the attack of issue 11: it was there
    assert files_mentioning(elsewhere, pseudonym) == ["head.pt"]
    r = subprocess.run(
        [sys.executable, "-m", "facefed.client.cli.main", "forget", "--vault", str(vault), "--person", person],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr + r.stdout
    assert files_mentioning(tmp_path, person) == []
    # Left: the request's own record (the request log the server is told from, and the vault's hash-chained
    # audit log of the erasure). Both name the random pseudonym only, which nothing else links to the person.
    assert set(files_mentioning(tmp_path, pseudonym)) <= {"vault/requests.sqlite", "vault/audit.log"}


def test_a_sites_own_photos_enrol_from_a_folder_and_train(lfw, pretrained_file, tmp_path):
    """Issue 13's failure, end to end: ordinary 640x480 photos (faces turned, off-centre, scaled) enrol
    through `vault import --dir` and `vault add`, a photo with no face is refused by its path, and
    `facefed-client train` trains on what was stored."""
    import io

    from photo_support import jpeg, raw_photo
    from PIL import Image
    from train_support import train_names
    from vault_support import make_stores

    from facefed.common.lfw import ImageKey

    names = train_names(lfw, 8)
    keys = [k for n in names for k in lfw.keys(n)[:2]]
    frames = {k: Image.open(io.BytesIO(b)).convert("RGB") for k, b in lfw.load_images(keys).items()}
    photos = tmp_path / "photos"
    for i, k in enumerate(keys[:-1]):  # the last image is enrolled by `vault add` below
        folder = photos / f"patient-{names.index(k.name):04d}"
        folder.mkdir(parents=True, exist_ok=True)
        photo = raw_photo(frames[k], angle=(-1) ** i * 12, scale=1.2 + 0.1 * (i % 3), at=(60 + 25 * i, 40))
        (folder / f"visit-{i}.jpg").write_bytes(jpeg(photo))
    wall = photos / "patient-0000" / "wall.png"  # no face
    Image.new("RGB", (640, 480), (200, 200, 200)).save(wall)
    group = photos / "patient-0002" / "visit-4.jpg"  # LFW's Abdel_Nasser_Assidi_0001 shows three people
    assert keys[4] == ImageKey("Abdel_Nasser_Assidi", 1)
    env = {**os.environ, "FACEFED_PRETRAINED": str(pretrained_file), "COLUMNS": "300"}

    def client(*args: str) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "facefed.client.cli.main", *args]
        return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)

    vault = tmp_path / "vault"
    r = client("vault", "init", "--vault", str(vault), "--stores", ",".join(make_stores(tmp_path / "s", 3)))
    assert r.returncode == 0, r.stderr
    r = client("vault", "import", "--vault", str(vault), "--dir", str(photos))
    assert r.returncode == 1, r.stderr + r.stdout  # two files refused, by path and reason; the rest imported
    assert f"photos in {photos}: 8 people, 16 images (0 already in the vault)" in r.stdout
    assert "imported 14 images of 8 people" in r.stdout and "2 file(s) were not imported" in r.stdout
    assert f"{wall}: no face found" in r.stdout and f"{group}: 3 faces found" in r.stdout
    wall.unlink()
    group.unlink()
    r = client("vault", "import", "--vault", str(vault), "--dir", str(photos))  # resumes: nothing stored twice
    assert r.returncode == 0 and "14 images (14 already in the vault)" in r.stdout and "imported 0 images" in r.stdout
    last = tmp_path / "holiday.jpg"
    last.write_bytes(jpeg(raw_photo(frames[keys[-1]], angle=-20, scale=1.5, at=(300, 100))))
    r = client("vault", "add", "--vault", str(vault), "--person", "patient-0007", str(last))
    assert r.returncode == 0 and "stored 1 image(s) of patient-0007 (2 in the vault)" in r.stdout, r.stderr
    r = client("vault", "import", "--vault", str(vault), "--dir", str(photos), "--lfw", "x.tgz")
    assert r.returncode == 2 and "--dir imports your own photos; --lfw select LFW people: drop them" in r.stderr

    write_policy(vault, Policy(delta=1e-3, max_epsilon=30.0))
    config = tmp_path / "train.toml"
    config.write_text(CONFIG)
    out = tmp_path / "model.ckpt"
    r = _train(vault, config, out, env)
    assert r.returncode == 0, r.stderr + r.stdout
    _, meta = load_checkpoint(out)
    assert meta["people"] == 8 and meta["privacy_unit"] == "person" and 0 < meta["epsilon"] < 30
