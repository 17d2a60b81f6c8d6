"""`facefed-client vault ...`: create, fill, inspect, repair and erase a site's face vault.

Exit codes: 0 ok; 1 the command ran but found problems (verify/repair) or left work pending (erase);
2 bad input (the message names the offending thing and how to fix it; no traceback).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Annotated, Any, Protocol

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from facefed.client.vault import Vault, VaultError
from facefed.client.vault.errors import InvalidImage
from facefed.client.vault.sharefile import MAX_IMAGE_BYTES
from facefed.client.vault.stores.base import StoreError
from facefed.client.vault.tombstones import tombstoned
from facefed.client.vault.validate import check_image
from facefed.common import cli as common_cli
from facefed.common.cli import fail
from facefed.common.errors import FacefedError
from facefed.common.lfw import LFW, PROTOCOL_FILES, ImageKey, partition_people
from facefed.common.paths import lfw_path

app = typer.Typer(help="Secret-shared face vault: init, import, add, ls, verify, repair, erase.", no_args_is_help=True)
out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

IMPORT_BATCH = 32  # images per put_many: one directory fsync per store and one manifest commit each
LFW_PEOPLE_DEFAULT = "peopleDevTrain.txt"
PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png")
# (person id, source name kept in the manifest, full path for messages, canonical crop or None: no face)
Crop = tuple[str, str, str, bytes | None]

VaultOpt = Annotated[
    Path,
    typer.Option("--vault", envvar="FACEFED_VAULT", file_okay=False, help="Vault directory (or set FACEFED_VAULT)."),
]


# Expected failures become one red line and exit code 2 (a traceback helps no operator).
clean_errors = common_cli.clean_errors(VaultError, StoreError, ValueError)


def _open(vault: Path) -> Vault:
    return Vault.open(vault)


@app.command()
@clean_errors
def init(
    vault: VaultOpt,
    stores: Annotated[
        str,
        typer.Option(
            "--stores",
            help="Comma-separated store directories (or grpcs://host:port "
            "holders), one per share, ideally on different disks. Order = x 1..n.",
        ),
    ],
    threshold: Annotated[int, typer.Option("--threshold", "-k", help="Shares needed to rebuild an image (2..n).")] = 2,
    tls_dir: Annotated[Path | None, typer.Option("--tls-dir", help="Client certificates for grpcs:// stores.")] = None,
) -> None:
    """Create an empty vault over n existing, empty store directories; any k of them rebuild an image."""
    if threshold == 1:  # Shamir with k = 1: every share is the image itself (the polynomial is constant)
        fail(
            "--threshold 1: with k = 1 every share is the image in plain form; "
            "give --threshold 2 or more (and at least that many stores)"
        )
    urls = [s.strip() for s in stores.split(",") if s.strip()]
    if not urls:
        fail("--stores is empty; give n comma-separated store directories, e.g. --stores /mnt/a/s,/mnt/b/s,/mnt/c/s")
    with Vault.create(vault, urls, threshold, tls_dir=tls_dir) as v:
        out.print(f"created vault {v.path}: any {v.k} of {v.n} stores rebuild an image", markup=False)
        for x, s in enumerate(v.stores, start=1):
            out.print(f"  x={x}  {s.url}", markup=False)


@app.command("import")
@clean_errors
def import_(
    vault: VaultOpt,
    folder: Annotated[
        Path | None,
        typer.Option(
            "--dir",
            file_okay=False,
            help="Your own photos: one subfolder per person, named by the person's id, holding JPEG/PNG photos "
            "of any size. Each photo must show exactly one face; any other is refused and listed.",
        ),
    ] = None,
    lfw: Annotated[
        str | None,
        typer.Option("--lfw", help="LFW archive (lfw-deepfunneled.tgz) or extracted tree; default $FACEFED_LFW."),
    ] = None,
    people: Annotated[
        str,
        typer.Option("--people", help="LFW people file to take names from, or `all` for every person in the archive."),
    ] = LFW_PEOPLE_DEFAULT,
    site_index: Annotated[int, typer.Option("--site-index", help="This site's index, 0..num-sites-1 (LFW).")] = 0,
    num_sites: Annotated[int, typer.Option("--num-sites", help="Sites the LFW people are split over (disjoint).")] = 1,
    min_images: Annotated[int, typer.Option("--min-images", help="Only people with at least this many images.")] = 1,
    max_people: Annotated[
        int | None,
        typer.Option("--max-people", help="At most this many people (first by name within this site's share)."),
    ] = None,
    allow_reenrol: Annotated[
        bool,
        typer.Option(
            "--allow-reenrol", help="Also import people who were forgotten here (only with their new consent)."
        ),
    ] = False,
) -> None:
    """Import many people at once: a folder of your own photos (--dir), or this site's share of LFW.

    Resumable: files already stored are skipped. Each photo is detected and aligned and stored as its
    canonical 224x224 crop. From --dir a photo must show exactly one face (as `vault add` requires);
    from LFW the face nearest the centre is taken (LFW's convention) and an image with none is skipped.
    Files refused are listed with their full path and reason, and the command exits 1."""
    if min_images < 1:
        fail(f"--min-images {min_images}: must be at least 1")
    if max_people is not None and max_people < 1:
        fail(f"--max-people {max_people}: must be at least 1")
    if folder is not None:
        lfw_options = [
            name
            for name, given in (
                ("--lfw", lfw is not None),
                ("--people", people != LFW_PEOPLE_DEFAULT),
                ("--site-index", site_index != 0),
                ("--num-sites", num_sites != 1),
            )
            if given
        ]
        if lfw_options:
            fail(f"--dir imports your own photos; {', '.join(lfw_options)} select LFW people: drop them")
        source: _ImportSource = _PhotoFolder(folder)
    else:
        source = _LfwShare(lfw, people, site_index, num_sites)
    counts = source.counts()
    mine = [n for n in counts if counts[n] >= min_images]
    if max_people is not None:
        mine = mine[:max_people]
    if not mine:
        fail(f"no people left to import ({source.label}, --min-images {min_images})")
    with _open(vault) as v:
        forgotten = set() if allow_reenrol else set(tombstoned(v.path, mine))
        if forgotten:  # a forgotten person stays forgotten when the site re-runs its import
            out.print(
                f"skipping {len(forgotten)} person(s) who asked to be forgotten here (--allow-reenrol to "
                f"enrol them again with new consent)"
            )
            mine = [n for n in mine if n not in forgotten]
        done = v.sources()
        todo = [(name, f) for name in mine for f in source.files(name) if (name, source.source_name(f)) not in done]
        total = sum(counts[n] for n in mine)
        out.print(
            f"{source.label}: {len(mine)} people, {total} images ({total - len(todo)} already in the vault)",
            markup=False,
        )
        started = time.perf_counter()
        batch: list[tuple[str, bytes, str]] = []
        paths: list[str] = []
        stored, duplicates, refused, skipped = 0, [], [], []

        def flush() -> None:  # one batch; bad files are reported (full path) and the import goes on
            nonlocal stored
            for path, o in zip(paths, v.add_images(batch, allow_reenrol=allow_reenrol)):
                if o.status == "stored":
                    stored += 1
                elif o.status == "duplicate":
                    duplicates.append(f"{path}: already stored (same image), skipped")
                else:
                    refused.append(f"{path}: {o.detail}")
                    err.print(f"[yellow]skipped {escape(path)}: {escape(o.detail)}[/yellow]")
            progress.advance(task, len(batch))
            batch.clear()
            paths.clear()

        def refuse(problem: str) -> None:
            refused.append(problem)
            err.print(f"[yellow]skipped {escape(problem)}[/yellow]")
            progress.advance(task)

        columns = (TextColumn("aligning + importing"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
        with Progress(*columns, console=err, transient=False) as progress:
            task = progress.add_task("import", total=len(todo))
            for name, source_name, where, crop in source.crops(todo, refuse):
                if crop is None:  # LFW image with no detectable face: skipped, reported below
                    skipped.append(where)
                    progress.advance(task)
                    continue
                batch.append((name, crop, source_name))
                paths.append(where)
                if len(batch) == IMPORT_BATCH:
                    flush()
            if batch:
                flush()
        elapsed = time.perf_counter() - started
        rate = f" ({stored / elapsed:.0f} images/s)" if stored and elapsed > 0 else ""
        out.print(f"imported {stored} images of {len(mine)} people in {elapsed:.1f} s{rate}", markup=False)
        for line in source.summary():
            out.print(line, markup=False)
        _print_some("LFW images skipped, no face detected", skipped)
        _print_some("duplicate images skipped", duplicates)
        _print_some("files refused", refused)
        if refused:
            out.print(f"[red]{len(refused)} file(s) were not imported[/red]: fix or remove them, then run it again")
            raise typer.Exit(1)


class _ImportSource(Protocol):
    """Where `vault import` takes people and their photos from."""

    label: str

    def counts(self) -> dict[str, int]: ...  # person -> images, in import order
    def files(self, person: str) -> list[Any]: ...
    def source_name(self, file: Any) -> str: ...  # what the manifest keeps, so a re-run skips it
    def crops(self, todo: list[tuple[str, Any]], refuse: Callable[[str], None]) -> Iterator[Crop]: ...
    def summary(self) -> list[str]: ...


class _PhotoFolder:
    """A site's own photos: FOLDER/<person id>/<photo>.jpg|png, any size, exactly one face each."""

    def __init__(self, folder: Path) -> None:
        if not folder.is_dir():
            fail(f"--dir {folder}: no such directory; give a folder with one subfolder of photos per person")
        self.folder = folder.absolute()
        self.label = f"photos in {self.folder}"
        self.people: dict[str, list[Path]] = {}
        for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
            photos = sorted(f for f in sub.iterdir() if f.is_file() and f.suffix.lower() in PHOTO_SUFFIXES)
            if photos:
                self.people[sub.name] = photos
        loose = [f.name for f in folder.iterdir() if f.is_file() and f.suffix.lower() in PHOTO_SUFFIXES]
        if loose:
            err.print(
                f"[yellow]{len(loose)} photo(s) directly in {escape(str(self.folder))} are not imported "
                f"(e.g. {escape(loose[0])}): put each person's photos in a subfolder named by their id[/yellow]"
            )
        if not self.people:
            fail(f"--dir {self.folder}: no subfolder holds JPEG/PNG photos; lay it out as DIR/<person id>/photo.jpg")

    def counts(self) -> dict[str, int]:
        return {name: len(files) for name, files in self.people.items()}

    def files(self, person: str) -> list[Path]:
        return self.people[person]

    def source_name(self, file: Path) -> str:
        return file.name[:255]  # as `vault add` names it

    def crops(self, todo: list[tuple[str, Path]], refuse: Callable[[str], None]) -> Iterator[Crop]:
        for name, path in todo:
            try:
                crop = photo_crop(path)
            except FacefedError as e:
                refuse(str(e))
                continue
            yield name, self.source_name(path), str(path.absolute()), crop

    def summary(self) -> list[str]:
        return []


class _LfwShare:
    """This site's disjoint share of the people of an LFW people file; the central face of each image."""

    def __init__(self, lfw: str | None, people: str, site_index: int, num_sites: int) -> None:
        from facefed.common.faces.lfw import AlignReport

        if num_sites < 1:
            fail(f"--num-sites {num_sites}: must be at least 1")
        if not 0 <= site_index < num_sites:
            fail(f"--site-index {site_index}: must be in 0..{num_sites - 1} for --num-sites {num_sites}")
        people_files = [f for f in PROTOCOL_FILES if f.startswith("people")]
        if people != "all" and people not in people_files:
            fail(f"--people {people!r}: use one of {', '.join(people_files)}, or `all`")
        self.dataset = LFW(lfw_path(lfw))
        self._counts = self.dataset.counts()
        names = list(self._counts) if people == "all" else list(dict.fromkeys(self.dataset.people(people)))
        missing = [n for n in names if n not in self._counts]
        if missing:
            fail(f"{people} lists {len(missing)} people without images in {self.dataset.path}, e.g. {missing[0]}")
        self.names = partition_people(names, num_sites)[site_index]
        self.label = f"LFW {people}, site {site_index} of {num_sites}"
        self.aligned = AlignReport()

    def counts(self) -> dict[str, int]:
        return {n: self._counts[n] for n in self.names}

    def files(self, person: str) -> list[ImageKey]:
        return self.dataset.keys(person)

    def source_name(self, file: ImageKey) -> str:
        return Path(file.relpath).name

    def where(self, key: ImageKey) -> str:
        path = self.dataset.path
        return f"{path}/{key.relpath}" if path.is_dir() else f"{path}:{key.relpath}"

    def crops(self, todo: list[tuple[str, ImageKey]], refuse: Callable[[str], None]) -> Iterator[Crop]:
        from facefed.common.faces import CANONICAL_MARGIN, encode_canonical
        from facefed.common.faces.lfw import align_public

        def sound(items: Iterable[tuple[ImageKey, bytes]]) -> Iterator[tuple[ImageKey, bytes]]:
            """The source files that decode fully; a damaged one is reported by path and skipped."""
            for key, data in items:
                try:
                    check_image(data, self.where(key), aligned=False)
                except FacefedError as e:
                    refuse(str(e))
                    continue
                yield key, data

        keys = [k for _, k in todo]
        faces = align_public(sound(self.dataset.iter_images(keys)), margin=CANONICAL_MARGIN, report=self.aligned)
        for key, _, crop in faces:
            yield key.name, self.source_name(key), self.where(key), None if crop is None else encode_canonical(crop)

    def summary(self) -> list[str]:
        return [f"aligned: {self.aligned.detected} detected, {self.aligned.cached} from the landmarks cache"]


@app.command()
@clean_errors
def add(
    vault: VaultOpt,
    person: Annotated[
        str,
        typer.Option(
            "--person",
            help="The person's id (your own identifier, kept only in the manifest; stores see a random pseudonym).",
        ),
    ],
    images: Annotated[list[Path], typer.Argument(help="JPEG/PNG files of this person.", show_default=False)],
    allow_reenrol: Annotated[
        bool,
        typer.Option("--allow-reenrol", help="Enrol a person who was forgotten here (only with their new consent)."),
    ] = False,
) -> None:
    """Add photos of one person (JPEG/PNG, any size). Each must show exactly one face, which is detected,
    aligned and stored as its canonical 224x224 crop. All files are checked first; if any is bad, nothing
    is stored. A photo already stored is skipped (same person) or refused (another person): exit 1."""
    items = [(person, photo_crop(path), path.name[:255]) for path in images]
    with _open(vault) as v:
        outcomes = v.add_images(items, allow_reenrol=allow_reenrol)
        stored = sum(o.status == "stored" for o in outcomes)
        problems = [f"{p}: {o.detail}" for p, o in zip(images, outcomes) if o.status != "stored"]
        n_now = v.person(person).n_images if stored or any(o.status == "duplicate" for o in outcomes) else 0
        out.print(f"stored {stored} image(s) of {person} ({n_now} in the vault)", markup=False)
        _print_some("not stored", problems)
        if any(o.status == "refused" for o in outcomes):
            raise typer.Exit(1)


def photo_crop(path: Path) -> bytes:
    """The canonical crop of the one face in the photo at `path`; a FacefedError naming its full path if
    the file is missing, too large, not a sound JPEG/PNG, or shows no usable face or several."""
    from facefed.common.faces import enrolment_crop

    full = str(path.absolute())
    if not path.is_file():
        raise InvalidImage(f"{full}: no such file")
    if path.stat().st_size > MAX_IMAGE_BYTES:
        raise InvalidImage(f"{full}: {path.stat().st_size} bytes is larger than the {MAX_IMAGE_BYTES} byte limit")
    data = path.read_bytes()
    check_image(data, full, aligned=False)
    return enrolment_crop(data, what=full)


@app.command("ls")
@clean_errors
def ls(
    vault: VaultOpt,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """List the people in the vault (person id, pseudonym, image count) and the stores."""
    with _open(vault) as v:
        people, health = v.people(), v.store_health()
        if as_json:
            print(
                json.dumps(
                    {
                        "k": v.k,
                        "n": v.n,
                        "stores": [
                            {"x": h.x, "url": h.url, "reachable": h.reachable, "shares": h.shares} for h in health
                        ],
                        "people": [
                            {"person_id": p.person_id, "pseudonym": p.pseudonym, "images": p.n_images} for p in people
                        ],
                    },
                    indent=1,
                )
            )
            return
        out.print(
            f"vault {escape(str(v.path))}: {len(people)} people, {sum(p.n_images for p in people)} images, "
            f"any {v.k} of {v.n} stores rebuild an image"
        )
        for h in health:
            state = f"{h.shares} shares" if h.reachable else f"[red]unreachable[/red] ({escape(h.error or '')})"
            out.print(f"  store x={h.x} {escape(h.url)}: {state}")
        table = Table("person id", "pseudonym", "images")
        for p in people:
            table.add_row(Text(p.person_id), p.pseudonym, str(p.n_images))
        out.print(table)


def _print_some(title: str, items: list, limit: int = 20) -> None:
    if not items:
        return
    out.print(f"[yellow]{title}: {len(items)}[/yellow]")
    for item in items[:limit]:
        out.print(f"  {item}", markup=False)
    if len(items) > limit:
        out.print(f"  ... and {len(items) - limit} more")


@app.command()
@clean_errors
def verify(vault: VaultOpt) -> None:
    """Read every share and check its tag; report missing, corrupt, orphan shares and the audit chain.
    Exit 1 if anything is wrong (run `repair`)."""
    with _open(vault) as v:
        r = v.verify()
    for s in r.stores:
        state = f"{s.shares} shares" if s.reachable else f"[red]unreachable[/red] ({escape(s.error or '')})"
        out.print(f"store x={s.x} {escape(s.url)}: {state}")
    out.print(
        f"{r.images} images, {r.shares_ok} valid shares; audit log: "
        + (
            f"{r.audit_entries} entries, chain intact"
            if r.audit_error is None
            else f"[red]{escape(r.audit_error)}[/red]"
        )
    )
    _print_some("missing shares", r.missing)
    _print_some("corrupt shares", r.corrupt)
    _print_some("shares in unreachable stores", r.unreachable)
    _print_some("images that cannot be rebuilt", r.unrecoverable)
    _print_some("images whose shares disagree", r.inconsistent)
    _print_some(
        "orphan shares",
        [f"x={o.x} {o.store}: {o.share_id} ({'this vault' if o.ours else 'not this vault'})" for o in r.orphans],
    )
    _print_some("misplaced stores (nothing in them is used or deleted)", r.misplaced_stores)
    if r.pending_deletions:
        out.print(f"[yellow]{r.pending_deletions} share deletion(s) of erased people still pending[/yellow]")
    if r.ok:
        out.print("[green]vault OK[/green]")
    elif r.misplaced_stores:
        out.print("[red]problems found[/red]: fix the stores first (`facefed-client vault remap` for swapped ones)")
        raise typer.Exit(1)
    else:
        out.print("[red]problems found[/red]: run `facefed-client vault repair`")
        raise typer.Exit(1)


@app.command()
@clean_errors
def repair(vault: VaultOpt) -> None:
    """Regenerate missing and corrupt shares from k valid ones, remove orphans, finish pending erasures."""
    with _open(vault) as v:
        r = v.repair()
    out.print(
        f"regenerated {len(r.regenerated)} share(s), removed {r.orphans_removed} orphan(s), "
        f"finished {r.pending_deletions_finished} pending deletion(s)"
    )
    _print_some("could not repair (store unreachable or refused the write)", r.not_repaired)
    _print_some("images that cannot be rebuilt (fewer than k valid shares)", r.unrecoverable)
    _print_some("images whose shares disagree", r.inconsistent)
    _print_some(
        "files in stores that are not this vault's (left alone)",
        [f"x={o.x} {o.store}: {o.share_id}" for o in r.foreign_orphans],
    )
    _print_some(
        "shares of this vault no record names (kept: a restored manifest may lack them)",
        [f"x={o.x} {o.store}: {o.share_id}" for o in r.orphans_kept],
    )
    _print_some("misplaced stores (nothing in them is used or deleted)", r.misplaced_stores)
    for x in r.stores_adopted:
        out.print(f"store x={x} was empty: it is this vault's x={x} again and was refilled", markup=False)
    if r.audit_error:
        out.print(f"[red]audit log: {escape(r.audit_error)}[/red] (not repairable: restore audit.log from a backup)")
    if r.pending_deletions_left:
        out.print(f"[yellow]{r.pending_deletions_left} deletion(s) still pending (store unreachable)[/yellow]")
    if r.ok:
        out.print("[green]vault repaired[/green]")
    else:
        out.print("[red]problems remain[/red] (listed above)")
        raise typer.Exit(1)


@app.command()
@clean_errors
def remap(
    vault: VaultOpt,
    yes: Annotated[bool, typer.Option("--yes", help="Rewrite vault.toml without asking.")] = False,
) -> None:
    """Put swapped or reordered stores back in order: each store's identity says which x it holds."""
    with _open(vault) as v:
        order = v.remap()
        if [u for _, u in order] == list(v.config.stores):
            out.print("every store is in its place; nothing to change")
            return
        for x, url in order:
            was = v.config.stores.index(url) + 1
            out.print(f"  x={x}: {url}" + (f"  (listed as x={was} now)" if was != x else ""), markup=False)
        if not yes and not typer.confirm("rewrite vault.toml in this order?"):
            fail("nothing changed")
        v.remap(apply=True)
    out.print("vault.toml rewritten; run `facefed-client vault verify`")


@app.command()
@clean_errors
def erase(
    vault: VaultOpt,
    person: Annotated[str, typer.Option("--person", help="The person id to forget.")],
    request_id: Annotated[
        str | None,
        typer.Option(
            "--request-id",
            help="Your reference for this erasure request (recorded in the audit log); default: a random id.",
        ),
    ] = None,
) -> None:
    """Destroy every share of a person in every store and their manifest rows, and log it in the audit chain.
    Exit 1 if a store was unreachable (its deletions stay pending and finish on the next open/repair)."""
    with _open(vault) as v:
        r = v.erase(person, request_id=request_id)
    out.print(
        f"erased {escape(person)}: {r.images} image(s), {r.shares_destroyed} share(s) destroyed, "
        f"request {r.request_id}, pseudonym {r.pseudonym}"
    )
    if r.shares_pending:
        out.print(
            f"[yellow]{r.shares_pending} share(s) pending in unreachable store(s): "
            f"{escape(', '.join(r.unreachable_stores))}[/yellow]"
        )
        verdict = (
            "the images are already unrecoverable (fewer than k shares remain)"
            if r.unrecoverable
            else "[red]the images may still be recoverable[/red] until the pending deletions finish"
        )
        out.print(verdict + "; they finish on the next open, verify or repair once the store is back")
        raise typer.Exit(1)
