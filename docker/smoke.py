"""`make docker-test`: build the images, run docker/compose.yml, and check it end to end.

    python3 docker/smoke.py [--people 4] [--images 4] [--keep-images] [--keep-up]

Steps (each the CLI an operator runs, see docker/README.md), with the time each took:
 1. build the image (one image, both CLIs; compose runs the README's commands in it);
 2. photos: a few disjoint LFW peopleDevTrain people per site, extracted from $FACEFED_LFW into a
    temporary folder that the site init containers mount read-only; screened in the image first, as
    `vault add` will see them (one usable face each), and only people with enough such photos kept;
 3. docker/secrets.sh: certificates and keys, one folder per service, CA keys in offline/ only;
 4. `compose up server` (its port 8000 the Fleet API only, the control port on 127.0.0.1 inside the
    container: checked from /proc/net/tcp and by a site asking the public port for the Control API),
    `facefed-server sites register` x3, `compose up` (9 share holders, 3 site inits that create each
    vault over its holders and enrol the photos, 3 site nodes that pin the server's receipt key);
 5. one federated round (`facefed-server train`, a small config within the sites' default privacy
    policy: `policy preview` before, the accountant's `status` after);
 6. `facefed-client forget` at north (and the operator deletes that person's photo folder),
    `facefed-server unlearn`, the receipt verified at the server (and a tampered copy rejected) and
    at the site against its pinned key;
 7. checks: the image (labels, non-root, healthcheck), every service healthy, trust boundaries (no
    container mounts a CA key; each holder mounts only its bundle), the person gone from the vault
    and their shares from every holder, and no container (volumes, bind mounts, tmpfs, container
    layer: read-only) holding their name or any slice of their photos' or canonical crops' bytes;
 8. `compose down -v`, the image removed, dangling layers pruned (always, also on failure).

Needs only Python 3 (stdlib), Docker and a compose (`docker compose` or `docker-compose`); LFW and
the weights from $FACEFED_LFW / $FACEFED_PRETRAINED. $FACEFED_TORCH_FIND_LINKS, when set, is where
the build takes the torch CPU wheel from (the Makefile sets it from `docker-engine wheels`).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SITES = ["north", "south", "east"]
HOLDERS = 3
PROJECT = "facefedtest"
T0 = time.monotonic()
TIMINGS: list[tuple[str, float]] = []


def log(msg: str) -> None:
    print(f"[docker-test {time.monotonic() - T0:6.0f}s] {msg}", flush=True)


class Failed(RuntimeError):
    pass


def sh(*args: str, check: bool = True, input: str | None = None, timeout: float = 900, quiet: bool = False, env=None):
    proc = subprocess.run(list(args), text=True, capture_output=True, input=input, timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise Failed(f"`{' '.join(args)}` exited {proc.returncode}:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    if not quiet and proc.returncode == 0 and os.environ.get("FACEFED_DOCKER_VERBOSE"):
        sys.stdout.write(proc.stdout)
    return proc


class Step:
    def __init__(self, name: str):
        self.name = name

    def __enter__(self):
        log(f"== {self.name}")
        self.t = time.monotonic()
        return self

    def __exit__(self, *exc):
        took = time.monotonic() - self.t
        TIMINGS.append((self.name, took))
        log(f"   {self.name}: {took:.0f} s{' (failed)' if exc[0] else ''}")
        return False


def compose_cmd() -> list[str]:
    if subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    raise Failed("no compose: install the Docker compose plugin (`docker compose`) or docker-compose")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def version() -> str:
    for line in (REPO / "pyproject.toml").read_text().splitlines():
        if line.startswith("version"):
            return line.split("=", 1)[1].strip().strip('"')
    return "dev"


def git(*args: str) -> str:
    proc = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else ""


# -- photos ---------------------------------------------------------------------------------------
SPARE_PEOPLE, SPARE_IMAGES = 3, 3  # candidates beyond what is enrolled, for photos `vault add` refuses


def extract_candidates(lfw: Path, out: Path, people: int, images: int) -> dict[str, dict[str, list[Path]]]:
    """Disjoint peopleDevTrain people (>= `images` images each) per site, `people` + SPARE_PEOPLE of
    them with up to `images` + SPARE_IMAGES photos each: `vault add` refuses a photo without exactly
    one usable face (a few LFW frames show two people), so `select_photos` picks from these."""
    with tarfile.open(lfw) as tar:
        member = next(m for m in tar if m.name.endswith("peopleDevTrain.txt"))
        rows = tar.extractfile(member).read().decode().split()
    counts = {rows[i]: int(rows[i + 1]) for i in range(1, len(rows) - 1, 2)}
    names = sorted(n for n, c in counts.items() if c >= images)
    random.Random(15).shuffle(names)
    chosen = {site: sorted(names[i :: len(SITES)][: people + SPARE_PEOPLE]) for i, site in enumerate(SITES)}
    wanted = {
        f"{n}/{n}_{j:04d}.jpg": (site, n)
        for site, ns in chosen.items()
        for n in ns
        for j in range(1, min(counts[n], images + SPARE_IMAGES) + 1)
    }
    result: dict[str, dict[str, list[Path]]] = {s: {n: [] for n in ns} for s, ns in chosen.items()}
    with tarfile.open(lfw) as tar:  # one pass over the archive
        for m in tar:
            key = "/".join(m.name.split("/")[-2:])
            if m.isfile() and key in wanted:
                site, name = wanted[key]
                dest = out / site / name / Path(key).name
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(tar.extractfile(m).read())
                result[site][name].append(dest)
    missing = [k for k in wanted if not (out / wanted[k][0] / k).exists()]
    if missing:
        raise Failed(f"{lfw} lacks {len(missing)} expected images, e.g. {missing[0]}")
    for d in out.rglob("*"):  # the init containers (uid 10001) read them
        d.chmod(0o755 if d.is_dir() else 0o644)
    out.chmod(0o755)
    return {site: {n: sorted(fs) for n, fs in ps.items()} for site, ps in result.items()}


# Run in the image: each photo through the enrolment `vault add` does (detect the one face, align,
# the canonical crop), printing per file either the refusal or three slices of the crop's bytes.
SCREENER = r"""
import json, os, sys
from facefed.common.faces import enrolment_crop
out = {}
for d, _, fs in os.walk(sys.argv[1]):
    for f in sorted(fs):
        p = os.path.join(d, f)
        rel = os.path.relpath(p, sys.argv[1])
        try:
            crop = enrolment_crop(open(p, "rb").read(), what=rel)
        except Exception as e:
            out[rel] = {"refused": str(e)}
            continue
        out[rel] = {"crop": [crop[int(len(crop) * x) : int(len(crop) * x) + 64].hex() for x in (0.25, 0.5, 0.75)]}
print(json.dumps(out))
"""


def select_photos(stack: Stack, out: Path, candidates: dict[str, dict[str, list[Path]]], people: int, images: int):
    """The first `people` candidates per site with `images` photos that enrol, those photos only (the
    rest deleted); and, per kept photo, slices of the canonical crop the vault will store."""
    res = json.loads(stack.throwaway("python", "-", "/photos", mounts=[f"{out}:/photos:ro"], input=SCREENER).stdout)
    refused = {rel: r["refused"] for rel, r in res.items() if "refused" in r}
    kept: dict[str, dict[str, list[Path]]] = {}
    crops: dict[Path, list[bytes]] = {}
    for site, persons in candidates.items():
        kept[site] = {}
        for name, files in persons.items():
            good = [f for f in files if "crop" in res.get(str(f.relative_to(out)), {})][:images]
            if len(kept[site]) < people and len(good) == images:
                kept[site][name] = good
                crops.update({f: [bytes.fromhex(h) for h in res[str(f.relative_to(out))]["crop"]] for f in good})
            else:
                shutil.rmtree(out / site / name)
                continue
            for f in files:
                if f not in good:
                    f.unlink()
        if len(kept[site]) < people:
            raise Failed(f"{site}: only {len(kept[site])} of the candidates have {images} photos that enrol")
    return kept, crops, refused


# -- scanning what containers hold ------------------------------------------------------------------
SCANNER = r"""
import json, os, sys
needles = {k: bytes.fromhex(v) for k, v in json.loads(sys.argv[1]).items()}
names = set(json.loads(sys.argv[2]))
hits, files, size = [], 0, 0
for root in sys.argv[3:]:
    if not os.path.exists(root):
        continue
    walk = [(root, [], [""])] if os.path.isfile(root) else os.walk(root)
    for d, _, fs in walk:
        for f in fs:
            p = os.path.join(d, f) if f else d
            if os.path.islink(p) or not os.path.isfile(p):
                continue
            if os.path.basename(p) in names:
                hits.append([p, "file named " + os.path.basename(p)])
            try:
                with open(p, "rb") as fh:
                    raw = fh.read()
            except OSError as e:
                hits.append([p, "unreadable: " + e.strerror])
                continue
            files += 1
            size += len(raw)
            hits += [[p, label] for label, n in needles.items() if n in raw]
print(json.dumps({"hits": hits, "files": files, "bytes": size}))
"""


class Stack:
    def __init__(self, args, work: Path, tag: str):
        self.args = args
        self.work = work
        self.tag = tag
        self.image = f"facefed:{tag}"
        self._cids: dict[str, str] = {}
        self.compose = [*compose_cmd(), "-p", PROJECT, "-f", str(HERE / "compose.yml")]
        self.env = dict(os.environ)
        self.env.update(
            {
                "FACEFED_TAG": tag,
                # creating a container copies the image with the vfs storage driver: minutes, not seconds
                "COMPOSE_HTTP_TIMEOUT": os.environ.get("COMPOSE_HTTP_TIMEOUT", "900"),
                "DOCKER_CLIENT_TIMEOUT": os.environ.get("DOCKER_CLIENT_TIMEOUT", "900"),
                "FACEFED_SECRETS": str(work / "secrets"),
                "FACEFED_PHOTOS": str(work / "photos"),
                "FACEFED_CONFIGS": str(work / "configs"),
                "FACEFED_SERVER_PUBLISH": f"127.0.0.1:{free_port()}",
                "FACEFED_LFW": str(Path(os.environ["FACEFED_LFW"]).resolve()),
                "FACEFED_PRETRAINED": str(Path(os.environ["FACEFED_PRETRAINED"]).resolve()),
            }
        )

    def dc(self, *args: str, **kw):
        return sh(*self.compose, *args, env=self.env, **kw)

    def exec(self, service: str, *args: str, **kw):
        """`docker exec -i` in the service's container (`compose exec -T` does the same; stdin is
        forwarded the same way by every docker client, which compose v1's exec is not sure to do)."""
        return sh("docker", "exec", "-i", self.cid(service), *args, **kw)

    def cid(self, service: str) -> str:
        if service not in self._cids:
            out = self.dc("ps", "-q", service, quiet=True).stdout.split()
            if not out:
                raise Failed(f"no container for {service}")
            self._cids[service] = out[0]
        return self._cids[service]

    def containers(self) -> list[dict]:
        ids = sh("docker", "ps", "-aq", "--filter", f"label=com.docker.compose.project={PROJECT}").stdout.split()
        return json.loads(sh("docker", "inspect", *ids).stdout) if ids else []

    def logs(self, tail: int = 60) -> str:
        return self.dc("logs", "--no-color", "--tail", str(tail), check=False, quiet=True).stdout

    def throwaway(
        self, *cmd: str, mounts: tuple[str, ...] | list[str] = (), root: bool = False, input: str | None = None, **kw
    ):
        """CMD in a one-off container of the image: no network, the given `-v` mounts, removed on exit."""
        opts = [a for m in mounts for a in ("-v", m)] + (["--user", "0"] if root else [])
        opts += ["-i"] if input is not None else []
        return sh(
            "docker", "run", "--rm", "--network", "none", *opts, "--entrypoint", cmd[0], self.image, *cmd[1:],
            input=input, quiet=True, **kw,
        )  # fmt: skip


def service(c: dict) -> str:
    return c["Config"]["Labels"].get("com.docker.compose.service", c["Name"])


def wait_for(what: str, check, timeout: float, every: float = 2.0):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last is True:
            return
        time.sleep(every)
    raise Failed(f"timed out after {timeout:.0f} s waiting for {what}: {last}")


def write_config(path: Path) -> None:
    """One short round, within every site's default privacy policy (`facefed-client policy show`:
    delta 1e-5, max_epsilon 10, noise multiplier >= 1): 2 probe + 3 steps at q = 0.5, sigma = 2 is
    epsilon about 3.1 per person at delta 1e-5; the unlearning replay adds as much again."""
    path.write_text(
        "\n".join(
            [
                "# make docker-test: one short round of per-person DP training at three sites.",
                'name = "docker-smoke"',
                "rounds = 1",
                "min_sites = 3",
                "round_timeout_s = 600",
                "wait_for_sites_s = 120",
                "max_round_attempts = 1",
                'weighting = "people"',
                "",
                "[evaluate]",
                'pairs = "pairsDevTest.txt"',
                "max_pairs = 100",
                "",
                "[train]",
                'privacy_unit = "person"',
                "delta = 1e-5",
                "max_epsilon = 10.0",
                "noise_multiplier = 2.0",
                "max_grad_norm = 1.0",
                "sample_rate = 0.5",
                "probe_steps = 2",
                "steps = 3",
                "lr = 0.0005",
                'train_from = "features"',
                'tune = "bias"',
                "",
            ]
        )
    )


def run(args) -> dict:
    lfw, weights = os.environ.get("FACEFED_LFW"), os.environ.get("FACEFED_PRETRAINED")
    if not lfw or not Path(lfw).exists() or not weights or not Path(weights).exists():
        raise Failed("set FACEFED_LFW (lfw-deepfunneled.tgz) and FACEFED_PRETRAINED (arcface_mobilefacenet.pth)")
    sh("docker", "info", quiet=True)
    tag = args.tag or f"{version()}-test"
    work = Path(tempfile.mkdtemp(prefix="facefed-docker-test-"))
    work.chmod(0o755)
    stack = Stack(args, work, tag)
    summary: dict = {}
    try:
        body(args, stack, summary)
    except BaseException:
        sys.stdout.write("\n--- compose logs (tail) ---\n" + stack.logs(25))
        raise
    finally:
        teardown(args, stack)
    return summary


def body(args, stack: Stack, summary: dict) -> None:
    env = stack.env
    # -- 1. images ----------------------------------------------------------------------------------
    with Step("build image"):
        build_env = dict(os.environ)
        if subprocess.run(["docker", "buildx", "version"], capture_output=True).returncode != 0:
            build_env["DOCKER_BUILDKIT"] = "0"  # no buildx plugin: the classic builder
        common = ["--network", "host", "-f", str(HERE / "Dockerfile")]
        if os.environ.get("FACEFED_TORCH_FIND_LINKS"):
            common += ["--build-arg", f"TORCH_FIND_LINKS={os.environ['FACEFED_TORCH_FIND_LINKS']}"]
        common += [
            "--build-arg",
            f"VERSION={version()}",
            "--build-arg",
            f"REVISION={os.environ.get('FACEFED_REVISION') or git('rev-parse', 'HEAD') or 'unknown'}",
        ]
        common += ["--build-arg", f"SOURCE={git('config', '--get', 'remote.origin.url') or 'local checkout'}"]
        sh("docker", "build", *common, "-t", stack.image, str(REPO), env=build_env, timeout=2400)
    img = json.loads(sh("docker", "image", "inspect", stack.image).stdout)[0]
    cfg = img["Config"]
    labels = cfg.get("Labels") or {}
    if cfg.get("User") in ("", "0", "root", None) or not cfg.get("Healthcheck"):
        raise Failed(f"{stack.image}: runs as {cfg.get('User')!r}, healthcheck {cfg.get('Healthcheck')}")
    if labels.get("org.opencontainers.image.version") != version() or not labels.get("org.opencontainers.image.source"):
        raise Failed(f"{stack.image}: labels {labels}")
    summary["image"] = (
        f"{stack.image}: {img['Size'] / 1e6:.0f} MB, user {cfg['User']}, healthcheck {cfg['Healthcheck']['Test']}, "
        f"labels version={labels['org.opencontainers.image.version']} source={labels['org.opencontainers.image.source']}"
    )

    # -- 2. photos, config, 3. secrets ------------------------------------------------------------------
    with Step("photos, config and secrets"):
        candidates = extract_candidates(Path(env["FACEFED_LFW"]), stack.work / "photos", args.people, args.images)
        photos, crops, refused = select_photos(stack, stack.work / "photos", candidates, args.people, args.images)
        n = sum(len(fs) for ps in candidates.values() for fs in ps.values())
        log(f"   {n} candidate photos screened in the image, {len(refused)} would be refused by `vault add`:")
        for why in list(refused.values())[:5]:
            log(f"     {why}")
        (stack.work / "configs").mkdir()
        write_config(stack.work / "configs" / "docker-smoke.toml")
        for p in (stack.work / "configs", stack.work / "configs" / "docker-smoke.toml"):
            p.chmod(0o755 if p.is_dir() else 0o644)
        out = sh(str(HERE / "secrets.sh"), str(stack.work / "secrets"), env=env).stdout
        log("   " + out.strip().splitlines()[-1])
        log(f"   photos: {', '.join(f'{s}: {len(p)} people' for s, p in photos.items())}, {args.images} images each")

    # -- 4. up -----------------------------------------------------------------------------------------
    with Step("server up, sites registered"):
        stack.dc("up", "-d", "--no-build", "server", timeout=1200)
        wait_for(
            "the server to be healthy", lambda: health(stack, "server") == "healthy" or health(stack, "server"), 300
        )
        summary["server ports"] = server_ports(stack)
        log("   " + summary["server ports"])
        for site in SITES:
            stack.exec(
                "server",
                "facefed-server",
                "sites",
                "register",
                f"/sites/{site}.pub",
                "--name",
                site,
                "--state",
                "/state",
            )
    with Step("holders, vault init + enrolment, site nodes up"):
        stack.dc("up", "-d", "--no-build", timeout=2400)
        states = {}

        def all_healthy():
            nonlocal states
            states = {service(c): status(c) for c in stack.containers()}
            bad = {s: v for s, v in states.items() if v not in ("healthy", "exited")}
            return True if not bad and len(states) == 1 + len(SITES) * (HOLDERS + 2) else bad

        wait_for("every service to be healthy", all_healthy, 600)
        for c in stack.containers():
            if c["State"]["Status"] == "exited" and c["State"]["ExitCode"] != 0:
                raise Failed(f"{service(c)} exited {c['State']['ExitCode']}")
        wait_for(
            "3 site nodes online at the server", lambda: nodes_online(stack) >= len(SITES) or nodes_online(stack), 180
        )
        summary["public port"] = public_port_refuses_control(stack)
        log("   " + summary["public port"])
        summary["services"] = f"{len(states)} containers: " + ", ".join(f"{s}={v}" for s, v in sorted(states.items()))
        for site in SITES:
            listing = json.loads(
                stack.exec(site, "facefed-client", "vault", "ls", "--vault", "/vault", "--json").stdout
            )
            if len(listing["people"]) != args.people or listing["n"] != HOLDERS:
                raise Failed(f"{site}: vault lists {len(listing['people'])} people over {listing['n']} stores")
            log(
                f"   {site}: {len(listing['people'])} people, k={listing['k']} of n={listing['n']}: "
                + ", ".join(f"{s['url']} ({s['shares']} shares)" for s in listing["stores"])
            )

    # -- 5. one round -------------------------------------------------------------------------------------
    with Step("one federated round"):
        # the site's own privacy policy (defaults): what this config will cost its people, before and after
        config = (stack.work / "configs" / "docker-smoke.toml").read_text()
        stack.exec("north", "sh", "-c", "cat > /tmp/docker-smoke.toml", input=config)
        preview = json.loads(
            stack.exec(
                "north",
                "facefed-client",
                "policy",
                "preview",
                "--vault",
                "/vault",
                "--config",
                "/tmp/docker-smoke.toml",
                "--json",
            ).stdout
        )
        policy = json.loads(
            stack.exec("north", "facefed-client", "policy", "show", "--vault", "/vault", "--json").stdout
        )
        stack.exec("north", "rm", "-f", "/tmp/docker-smoke.toml")
        if not preview["fits"]:
            raise Failed(f"the smoke config does not fit north's policy: {preview}")
        proc = stack.exec(
            "server",
            "facefed-server",
            "train",
            "--state",
            "/state",
            "--config",
            "/configs/docker-smoke.toml",
            check=False,
            timeout=900,
        )
        tail = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()][-12:]
        for line in tail:
            log("   | " + line)
        if proc.returncode != 0:
            raise Failed(f"facefed-server train exited {proc.returncode}")
        results = [x.strip() for x in (proc.stdout + proc.stderr).splitlines() if x.strip().startswith("round ")]
        summary["train"] = results[-3:]  # the rounds' result lines, not the progress ("  ... round 1/1 ...")
        spent = json.loads(stack.exec("north", "facefed-client", "status", "--vault", "/vault", "--json").stdout)
        if not 0 < spent["epsilon_spent"] <= policy["max_epsilon"]:
            raise Failed(f"north's accountant after the round: {spent}")
        summary["privacy"] = (
            f"north's policy: delta {policy['delta']:g}, max_epsilon {policy['max_epsilon']:g}; preview "
            f"{preview['epsilon_after']:.2f}, spent {spent['epsilon_spent']:.2f} after the round"
        )
        log("   " + summary["privacy"])

    # -- 6. forget, unlearn, receipt ------------------------------------------------------------------
    with Step("forget at north"):
        before = json.loads(stack.exec("north", "facefed-client", "vault", "ls", "--vault", "/vault", "--json").stdout)
        victim = max(before["people"], key=lambda p: (p["images"], p["person_id"]))
        person = victim["person_id"]
        stack.exec(
            "north",
            "facefed-client",
            "forget",
            "--vault",
            "/vault",
            "--person",
            person,
            "--reason",
            "docker-test: request by the data subject",
        )
        # what the scan looks for, taken before the operator deletes the source photos too
        needles = person_needles(person, photos["north"][person], crops)
        shutil.rmtree(stack.work / "photos" / "north" / person)
        after = json.loads(stack.exec("north", "facefed-client", "vault", "ls", "--vault", "/vault", "--json").stdout)
        if any(p["person_id"] == person for p in after["people"]):
            raise Failed(f"{person} still listed after forget")
        drops = [b["shares"] - a["shares"] for b, a in zip(before["stores"], after["stores"])]
        if drops != [victim["images"]] * HOLDERS:
            raise Failed(f"shares per holder dropped by {drops}, expected {victim['images']} each")
        stack.exec("north", "facefed-client", "vault", "verify", "--vault", "/vault")
        log(
            f"   forgot {person} ({victim['images']} images, pseudonym {victim['pseudonym']}): "
            f"shares per holder {[s['shares'] for s in before['stores']]} -> {[s['shares'] for s in after['stores']]}"
        )
        summary["forgotten"] = (
            f"{person} at north: {victim['images']} images, one share each on {HOLDERS} holders destroyed"
        )
    with Step("unlearn (replay without them)"):
        proc = stack.exec(
            "server", "facefed-server", "unlearn", "--state", "/state", "--wait", "60", check=False, timeout=900
        )
        for line in [x for x in (proc.stdout + proc.stderr).splitlines() if x.strip()][-8:]:
            log("   | " + line)
        if proc.returncode != 0:
            raise Failed(f"facefed-server unlearn exited {proc.returncode}")
    with Step("receipt verified at the server"):
        requests_ = json.loads(
            stack.exec("north", "facefed-client", "forget", "status", "--vault", "/vault", "--json").stdout
        )
        req = requests_[-1]
        rid = req["request_id"]
        receipt = stack.exec("north", "cat", f"/vault/receipts/{rid}.json").stdout
        stack.exec("server", "sh", "-c", "cat > /tmp/receipt.json", input=receipt)
        out = stack.exec(
            "server", "facefed-server", "receipts", "verify", "/tmp/receipt.json", "--state", "/state"
        ).stdout
        doc = json.loads(receipt)
        doc["receipt"]["checkpoints_deleted"] = doc["receipt"]["checkpoints_deleted"][:-1]
        stack.exec("server", "sh", "-c", "cat > /tmp/tampered.json", input=json.dumps(doc))
        bad = stack.exec(
            "server", "facefed-server", "receipts", "verify", "/tmp/tampered.json", "--state", "/state", check=False
        )
        if bad.returncode != 1:
            raise Failed(f"a tampered receipt gave exit {bad.returncode}, expected 1")
        stack.exec("server", "rm", "-f", "/tmp/receipt.json", "/tmp/tampered.json")
        # and at the site, against the server key pinned at start (--receipt-key)
        stack.exec("north", "facefed-client", "receipts", "verify", f"/vault/receipts/{rid}.json", "--vault", "/vault")
        body_ = json.loads(receipt)["receipt"]
        summary["receipt"] = (
            f"{rid}: stages {req.get('stage', req.get('stages', '?'))}, rollback to round {body_['rollback_round']}, "
            f"replayed {body_['replayed_rounds']}, {len(body_['checkpoints_deleted'])} checkpoints deleted; "
            f"verified at the server and at north (pinned key), tampered copy rejected"
        )
        log("   " + summary["receipt"])
        log("   " + " ".join(out.split())[:300])

    # -- 7. what containers hold ---------------------------------------------------------------------
    with Step("scan every container for the person and CA keys"):
        summary["scan"] = scan(stack, person, needles)
        summary["mounts"] = boundaries(stack)


def status(c: dict) -> str:
    """healthy / starting / unhealthy for a running container, else its state (exited: see ExitCode)."""
    if c["State"]["Status"] != "running":
        return c["State"]["Status"]
    return c["State"].get("Health", {}).get("Status", "running")


def health(stack: Stack, svc: str) -> str:
    return status(json.loads(sh("docker", "inspect", stack.cid(svc)).stdout)[0])


def nodes_online(stack: Stack) -> int:
    proc = stack.exec(
        "server",
        "sh",
        "-c",
        "FLWR_HOME=/state/flwr flwr supernode list --format json",
        check=False,
        quiet=True,
        timeout=60,
    )
    out = proc.stdout
    try:
        nodes = json.loads(out[out.find("{") :]).get("nodes", [])
    except ValueError:
        return 0
    return sum(1 for n in nodes if n.get("status") == "online")


LISTENERS = r"""
import json
out = []
for table in ("/proc/net/tcp", "/proc/net/tcp6"):
    for line in open(table).read().splitlines()[1:]:
        f = line.split()
        if f[3] == "0A":
            addr, port = f[1].rsplit(":", 1)
            out.append([addr, int(port, 16)])
print(json.dumps({"listening": out, "server": json.load(open("/state/server.json"))}))
"""


def loopback(addr: str) -> bool:
    """127.0.0.0/8 or ::1 as /proc/net/tcp{,6} write them (Docker's DNS resolver listens on 127.0.0.11)."""
    return (len(addr) == 8 and addr.endswith("7F")) or addr == "00000000000000000000000001000000"


def server_ports(stack: Stack) -> str:
    """Inside the server container: the public port (8000) listens on every address, the control
    port (Control + Runtime APIs, server.json's address) on 127.0.0.1 only, and nothing else but
    loopback listens."""
    doc = json.loads(stack.exec("server", "python", "-", input=LISTENERS, quiet=True).stdout)
    listening = {(a, p) for a, p in doc["listening"]}
    control = int(doc["server"]["address"].rsplit(":", 1)[1])
    if doc["server"]["address"] != f"127.0.0.1:{control}" or ("0100007F", control) not in listening:
        raise Failed(f"control port: server.json says {doc['server']['address']}; listening {sorted(listening)}")
    if not any(p == 8000 and a.strip("0") == "" for a, p in listening):
        raise Failed(f"the public port 8000 does not listen on every address: {sorted(listening)}")
    exposed = sorted((a, p) for a, p in listening if not loopback(a) and p != 8000)
    if exposed or any(p == control and not loopback(a) for a, p in listening):
        raise Failed(f"the server listens beyond loopback on {exposed or control}")
    return f"public 0.0.0.0:8000 (Fleet API), control 127.0.0.1:{control} (Control + Runtime APIs), nothing else beyond loopback"


PROBE = r"""
import ssl, sys, urllib.error, urllib.request
ctx = ssl.create_default_context(cafile="/federation/ca.crt")
for path in sys.argv[1:]:
    try:
        code = urllib.request.urlopen("https://server:8000" + path, context=ctx, timeout=20).status
    except urllib.error.HTTPError as e:
        code = e.code
    print(path, code)
"""


def public_port_refuses_control(stack: Stack) -> str:
    """From a site (on the federation network, holding the CA certificate): the Control and Runtime
    APIs on the sites' port answer 403, and the server logs the refusal."""
    paths = ["/v1/control/list-runs", "/v1/control/list-supernodes", "/v1/runtime/get-run"]
    out = stack.exec("north", "python", "-", *paths, input=PROBE, quiet=True, timeout=120).stdout
    codes = dict(line.rsplit(" ", 1) for line in out.splitlines() if line.strip())
    if any(codes.get(p) != "403" for p in paths):
        raise Failed(f"server:8000 answered {codes} to Control/Runtime API paths; expected 403 each")
    logged = stack.exec("server", "cat", "/state/logs/control-plane.jsonl", check=False, quiet=True).stdout
    n = logged.count('"public-port-refused"')
    if n < len(paths):
        raise Failed(f"the server logged {n} public-port refusals, expected {len(paths)}")
    return f"server:8000 from north: {', '.join(f'{p} -> {c}' for p, c in codes.items())}; {n} refusals logged"


def offline_keys(stack: Stack) -> dict[str, bytes]:
    """The CA private keys in secrets/offline/, which no container may hold (read here on the host:
    offline/ is root's; without root, a throwaway container reads them)."""
    offline = stack.work / "secrets" / "offline"
    try:
        keys = {f"CA key {p.parent.name}/ca.key": p.read_bytes() for p in sorted(offline.glob("*/ca.key"))}
    except PermissionError:
        out = stack.throwaway(
            "sh",
            "-c",
            "for f in /offline/*/ca.key; do printf '%s ' \"$f\"; od -An -v -tx1 \"$f\" | tr -d ' \\n'; echo; done",
            mounts=[f"{offline}:/offline:ro"],
            root=True,
        ).stdout
        keys = {}
        for line in out.splitlines():
            path, hexed = line.split(" ", 1)
            keys[f"CA key {Path(path).parent.name}/ca.key"] = bytes.fromhex(hexed.strip())
    if len(keys) != 1 + len(SITES):
        raise Failed(f"expected {1 + len(SITES)} CA keys in offline/, found {sorted(keys)}")
    return keys


def person_needles(person: str, photos: list[Path], crops: dict[Path, list[bytes]]) -> dict[str, bytes]:
    """The person's id, and three 64-byte slices of each of their photo files and of the canonical
    crop of each (what the vault stores, secret-shared)."""
    needles: dict[str, bytes] = {f"name {person}": person.encode()}
    for p in photos:
        raw = p.read_bytes()
        for frac in (0.25, 0.5, 0.75):
            at = int(len(raw) * frac)
            needles[f"bytes of {p.name}@{frac}"] = raw[at : at + 64]
        for frac, piece in zip((0.25, 0.5, 0.75), crops.get(p, [])):
            needles[f"bytes of {p.name}'s canonical crop@{frac}"] = piece
    return needles


def scan(stack: Stack, person: str, needles: dict[str, bytes]) -> str:
    needles = dict(needles)
    person_labels = set(needles)
    needles.update(offline_keys(stack))
    hexed = json.dumps({k: v.hex() for k, v in needles.items()})
    names = json.dumps(["ca.key"])
    hits: list[tuple[str, str, str]] = []
    files = size = 0
    containers = stack.containers()
    volumes = sorted({m["Name"] for c in containers for m in c["Mounts"] if m["Type"] == "volume"})
    # a. every named volume of the stack (vaults, share holders, server state), in one throwaway container
    mounts = [f"{v}:/scan/{v}:ro" for v in volumes]
    res = json.loads(stack.throwaway("python", "-", hexed, names, "/scan", mounts=mounts, input=SCANNER).stdout)
    hits += [("volumes", p, why) for p, why in res["hits"]]
    files, size = files + res["files"], size + res["bytes"]
    for c in containers:
        svc = service(c)
        binds = [m for m in c["Mounts"] if m["Type"] == "bind"]
        if not c["HostConfig"].get("ReadonlyRootfs"):
            hits.append((svc, "/", "root filesystem is writable"))
        # b. bind mounts: the offline CA folder is never one; the read-only data (/data) is public LFW + weights
        for m in binds:
            if "/offline" in m["Source"]:
                hits.append((svc, m["Destination"], f"mounts {m['Source']}"))
            if m["RW"] and not m["Destination"].startswith("/tmp"):
                hits.append((svc, m["Destination"], "bind mount is writable"))
        # c. running containers: their tmpfs and secrets as they see them
        if c["State"]["Running"]:
            roots = list((c["HostConfig"].get("Tmpfs") or {}).keys())
            roots += [m["Destination"] for m in binds if not m["Destination"].startswith("/data")]
            res = json.loads(stack.exec(svc, "python", "-", hexed, names, *roots, input=SCANNER, quiet=True).stdout)
            hits += [(svc, p, why) for p, why in res["hits"]]
            files, size = files + res["files"], size + res["bytes"]
        else:  # stopped (the site inits): a read-only root, their tmpfs is gone; photo folders are on the host
            for m in binds:
                if m["Destination"] == "/photos":
                    left = [p for p in Path(m["Source"]).rglob("*") if person in p.name]
                    hits += [(svc, str(p), "photo left in the host folder") for p in left]
    if hits:
        raise Failed("found in containers:\n" + "\n".join(f"  {s}: {p}: {w}" for s, p, w in hits[:40]))
    log(
        f"   scanned {files} files ({size / 1e6:.1f} MB) in {len(volumes)} volumes and {len(containers)} containers' "
        f"mounts and tmpfs: no trace of {person} ({len(person_labels)} needles), no CA key; every root read-only"
    )
    return (
        f"{files} files ({size / 1e6:.1f} MB) in {len(volumes)} volumes + {len(containers)} containers: "
        f"0 hits for {person}'s name, photo or crop bytes ({len(person_labels)} needles), "
        f"0 CA keys, every root filesystem read-only"
    )


def boundaries(stack: Stack) -> dict[str, str]:
    """Which service mounts which secret folder (for the summary), and that each holder has only its own."""
    out = {}
    secrets = str(stack.work / "secrets")
    for c in stack.containers():
        svc = service(c)
        mine = sorted(m["Source"].replace(secrets + "/", "") for m in c["Mounts"] if m["Source"].startswith(secrets))
        vols = sorted(m["Name"].replace(PROJECT + "_", "") for m in c["Mounts"] if m["Type"] == "volume")
        if "holder" in svc and (mine != [svc] or len(vols) != 1):
            raise Failed(f"{svc} mounts secrets {mine} and volumes {vols}; expected only its own bundle and shares")
        out[svc] = f"secrets {mine or '-'}; volumes {vols or '-'}"
    return dict(sorted(out.items()))


def teardown(args, stack: Stack) -> None:
    with Step("teardown and prune"):
        if args.keep_up:
            log(f"   --keep-up: the stack stays up (project {PROJECT}); work folder {stack.work}")
            return
        stack.dc("down", "-v", "--remove-orphans", "--timeout", "20", check=False, timeout=300)
        left = sh(
            "docker", "volume", "ls", "-q", "--filter", f"label=com.docker.compose.project={PROJECT}", check=False
        ).stdout.split()
        if left:
            sh("docker", "volume", "rm", *left, check=False)
        # the work folder holds 10001-owned secrets: without root, remove them from a container as root
        shutil.rmtree(stack.work, ignore_errors=True)
        if stack.work.exists():
            stack.throwaway(
                "sh", "-c", "rm -rf /work/* /work/.[!.]*", mounts=[f"{stack.work}:/work"], root=True, check=False
            )
            shutil.rmtree(stack.work, ignore_errors=True)
        if not args.keep_images:  # the image, and the build stage's layers (dangling: the build cache)
            sh("docker", "rmi", stack.image, check=False)
            sh("docker", "image", "prune", "-f", check=False)
        sh("docker", "container", "prune", "-f", "--filter", f"label=com.docker.compose.project={PROJECT}", check=False)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--people", type=int, default=4, help="people enrolled per site (default 4)")
    ap.add_argument("--images", type=int, default=4, help="photos per person (default 4)")
    ap.add_argument("--tag", default="", help="image tag (default VERSION-test)")
    ap.add_argument("--keep-images", action="store_true", help="keep the built image (faster reruns)")
    ap.add_argument("--keep-up", action="store_true", help="leave the stack and its work folder up (debugging)")
    args = ap.parse_args()
    # SIGTERM / SIGINT (a CI timeout, `kill`; SIGINT is ignored in background jobs) unwind through
    # the `finally` that tears the stack down
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        summary = run(args)
    except Failed as e:
        log(f"FAILED: {e}")
        print_timings()
        return 1
    print("\n== docker-test summary")
    for k, v in summary.items():
        if isinstance(v, dict):
            print(f"{k}:")
            for kk, vv in v.items():
                print(f"  {kk:14s} {vv}")
        elif isinstance(v, list):
            print(f"{k}:")
            for vv in v:
                print(f"  {vv}")
        else:
            print(f"{k}: {v}")
    print_timings()
    print("docker-test: PASSED")
    return 0


def print_timings() -> None:
    print("\n== timings")
    for name, took in TIMINGS:
        print(f"  {name:48s} {took:6.0f} s")
    print(f"  {'total':48s} {time.monotonic() - T0:6.0f} s")


if __name__ == "__main__":
    sys.exit(main())
