"""`facefed-client vault ...` on real LFW data and real directories: the flow, exit codes, clean errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner
from vault_support import load_faces, make_stores, offline, share_files

from facefed.client.cli.vault import (
    app,  # the `vault` group itself: the console script test below covers the entry point
)

REPO = Path(__file__).resolve().parents[1]
COMMANDS = ["init", "import", "add", "ls", "verify", "repair", "erase"]


def run(*args: str):
    return CliRunner().invoke(app, list(args))


def one_error_line(result, *needles: str) -> None:
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.fixture
def vault_dir(tmp_path) -> Path:
    stores = make_stores(tmp_path, 3)
    result = run("init", "--vault", str(tmp_path / "vault"), "--stores", ",".join(stores), "--threshold", "2")
    assert result.exit_code == 0, result.output
    assert "any 2 of 3 stores" in result.stdout
    return tmp_path / "vault"


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_explains_itself(command):
    result = run(command, "--help")
    assert result.exit_code == 0 and "Usage:" in result.stdout and "--vault" in result.stdout


def test_import_ls_verify_repair_erase(vault_dir, lfw_file, tmp_path):
    result = run(
        "import",
        "--vault",
        str(vault_dir),
        "--lfw",
        str(lfw_file),
        "--site-index",
        "0",
        "--num-sites",
        "3",
        "--max-people",
        "6",
        "--min-images",
        "2",
    )
    assert result.exit_code == 0, result.output
    assert "site 0 of 3: 6 people" in result.stdout and "imported" in result.stdout
    listing = json.loads(run("ls", "--vault", str(vault_dir), "--json").stdout)
    assert len(listing["people"]) == 6 and all(p["images"] >= 2 for p in listing["people"])
    assert [s["shares"] for s in listing["stores"]] == [sum(p["images"] for p in listing["people"])] * 3
    assert run("verify", "--vault", str(vault_dir)).exit_code == 0

    share_files(tmp_path / "store2")[0].unlink()
    result = run("verify", "--vault", str(vault_dir))
    assert result.exit_code == 1 and "missing shares: 1" in result.stdout
    result = run("repair", "--vault", str(vault_dir))
    assert result.exit_code == 0 and "regenerated 1 share" in result.stdout
    assert run("verify", "--vault", str(vault_dir)).exit_code == 0

    victim = listing["people"][0]["person_id"]
    result = run("erase", "--vault", str(vault_dir), "--person", victim, "--request-id", "REQ-7")
    assert result.exit_code == 0 and f"erased {victim}" in result.stdout and "REQ-7" in result.stdout
    after = json.loads(run("ls", "--vault", str(vault_dir), "--json").stdout)
    assert victim not in [p["person_id"] for p in after["people"]] and len(after["people"]) == 5
    result = run("verify", "--vault", str(vault_dir))
    assert result.exit_code == 0 and "chain intact" in result.stdout


def test_add_real_files_and_reject_a_bad_one_without_storing_any(vault_dir, lfw, tmp_path):
    person, imgs = next(iter(load_faces(lfw, 12).items()))
    files = []
    for name, data in imgs:
        (tmp_path / name).write_bytes(data)
        files.append(str(tmp_path / name))
    (tmp_path / "notes.jpg").write_text("not an image")
    one_error_line(
        run("add", "--vault", str(vault_dir), "--person", person, *files, str(tmp_path / "notes.jpg")),
        "notes.jpg",
        "not a JPEG or PNG",
    )
    assert json.loads(run("ls", "--vault", str(vault_dir), "--json").stdout)["people"] == []
    result = run("add", "--vault", str(vault_dir), "--person", person, *files)
    assert result.exit_code == 0 and f"stored {len(files)} image(s) of {person}" in result.stdout
    one_error_line(
        run("add", "--vault", str(vault_dir), "--person", person, str(tmp_path / "absent.jpg")),
        "absent.jpg",
        "no such file",
    )


def test_person_ids_with_markup_characters_print_verbatim(vault_dir, lfw, tmp_path):
    _, imgs = next(iter(load_faces(lfw, 12).items()))
    (tmp_path / "a.jpg").write_bytes(imgs[0][1])
    person = "[/] O'Brien [bold]2[/bold]"
    result = run("add", "--vault", str(vault_dir), "--person", person, str(tmp_path / "a.jpg"))
    assert result.exit_code == 0 and f"of {person} (1 in the vault)" in result.stdout
    assert person in run("ls", "--vault", str(vault_dir)).stdout
    result = run("erase", "--vault", str(vault_dir), "--person", person)
    assert result.exit_code == 0 and f"erased {person}:" in result.stdout
    one_error_line(run("erase", "--vault", str(vault_dir), "--person", person), f"unknown person {person!r}")


def test_bad_input_exits_2_with_one_clear_line(vault_dir, tmp_path, lfw_file):
    stores = make_stores(tmp_path / "more", 3)
    one_error_line(
        run("init", "--vault", str(tmp_path / "v2"), "--stores", ",".join(stores), "--threshold", "4"), "k=4", "n=3"
    )
    one_error_line(
        run("init", "--vault", str(tmp_path / "v2"), "--stores", ",".join(stores), "--threshold", "0"), "k=0"
    )
    # k = 1 (issue 11): a single share IS the image (constant polynomial): refused, nothing created.
    one_error_line(
        run("init", "--vault", str(tmp_path / "v1"), "--stores", ",".join(stores), "--threshold", "1"),
        "--threshold 1",
        "plain form",
    )
    assert not (tmp_path / "v1").exists() and all(not list(Path(s).iterdir()) for s in stores)
    one_error_line(
        run("init", "--vault", str(tmp_path / "v2"), "--stores", f"{stores[0]},{tmp_path}/gone", "--threshold", "2"),
        f"{tmp_path}/gone",
        "does not exist",
    )
    one_error_line(run("init", "--vault", str(vault_dir), "--stores", ",".join(stores)), "already a vault")
    one_error_line(run("ls", "--vault", str(tmp_path / "nowhere")), "no vault at", "vault init")
    one_error_line(run("erase", "--vault", str(vault_dir), "--person", "Nobody"), "unknown person 'Nobody'")
    one_error_line(
        run("import", "--vault", str(vault_dir), "--lfw", str(lfw_file), "--site-index", "3", "--num-sites", "3"),
        "--site-index 3",
    )
    one_error_line(
        run("import", "--vault", str(vault_dir), "--lfw", str(lfw_file), "--people", "pairs.txt"), "pairs.txt"
    )
    one_error_line(
        run("import", "--vault", str(vault_dir), "--lfw", str(tmp_path / "no.tgz")), "no.tgz", "does not exist"
    )


def test_erase_with_a_store_down_exits_1_and_says_what_is_pending(vault_dir, lfw, tmp_path):
    person, imgs = next(iter(load_faces(lfw, 12).items()))
    (tmp_path / "a.jpg").write_bytes(imgs[0][1])
    assert run("add", "--vault", str(vault_dir), "--person", person, str(tmp_path / "a.jpg")).exit_code == 0
    with offline(tmp_path / "store3"):
        result = run("erase", "--vault", str(vault_dir), "--person", person)
        assert result.exit_code == 1
        assert "1 share(s) pending" in result.stdout and "already unrecoverable" in result.stdout
        assert run("verify", "--vault", str(vault_dir)).exit_code == 1
    assert run("verify", "--vault", str(vault_dir)).exit_code == 0  # back: the deletion finished on open
    assert share_files(tmp_path / "store3") == []


def test_console_script_reports_bad_input_without_traceback(tmp_path):
    script = Path(sys.executable).with_name("facefed-client")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "facefed.client.cli.main"]
    stores = make_stores(tmp_path, 2)
    proc = subprocess.run(
        cmd + ["vault", "init", "--vault", str(tmp_path / "v"), "--stores", ",".join(stores), "--threshold", "3"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == ["error: threshold k=3 with n=2 stores: need 1 <= k <= n"]
