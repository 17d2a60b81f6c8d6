"""Privilege separation at a site: the SuperNode and every ClientApp run as a user that cannot read the vault.

Whatever arrives from the server runs inside Flower's SuperNode and its `flwr-clientapp` processes.
The FAB guard (client/site/guard.py) refuses foreign code, but it is code in a process that could be
bypassed; this is the layer that holds even then. `facefed-client start --node-user USER`, run as
root, splits the site into two Unix users:

- the training worker (client/site/worker.py) runs as the vault's owner: it alone opens the vault,
  its key, the site state (heads, contribution log) and the accountant, and it answers only typed,
  size-bounded calls (common/protocol/worker.py) that it checks against the site's own policy;
- the SuperNode, its SuperExec and every ClientApp run as USER, with no supplementary groups, in
  NODE_DIR (below). USER can reach the worker's socket and the SuperLink, nothing of the vault: the
  vault and state directories must be 0700 and owned by another user (checked at start).

NODE_DIR (root-owned, 0755):
  node.toml   the node config (site name, paths, `link`, `privsep`): not secret, 0644
  ca.crt      copy of the federation CA certificate, 0644
  home/       USER's 0700 home and FLWR_HOME: the node key copy (0600), the `flwr-clientapp` shim
  link/       the worker's socket and its HMAC key: owner = vault owner, group = USER's group, 02750
              (setgid: the socket the worker creates is group USER), key 0640, socket 0660

A privilege-separated ClientApp never trains in its own process: without the worker it refuses the
round (it could not open the vault anyway).
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import stat
import sys
from dataclasses import dataclass
from pathlib import Path

from facefed.common.errors import FacefedError

NODE_CONFIG = "node.toml"
CA_CERT = "ca.crt"
HOME = "home"
LINK = "link"
NODE_KEY = "node.key"


class PrivsepError(FacefedError, RuntimeError):
    """Privilege separation cannot be set up; the message says what to fix."""


@dataclass(frozen=True)
class Account:
    name: str
    uid: int
    gid: int


def node_account(name: str) -> Account:
    """The node user, which must exist and must not be root."""
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        raise PrivsepError(
            f"--node-user {name}: no such user; create one that owns nothing, e.g. "
            f"`useradd --system --no-create-home --shell /usr/sbin/nologin {name}`"
        ) from None
    if pw.pw_uid == 0:
        raise PrivsepError(f"--node-user {name} is root: the node user must be an unprivileged account")
    return Account(name, pw.pw_uid, pw.pw_gid)


def owner_of(path: Path) -> Account:
    st = path.stat()
    try:
        name = pwd.getpwuid(st.st_uid).pw_name
    except KeyError:
        name = str(st.st_uid)
    return Account(name, st.st_uid, st.st_gid)


def check(vault: Path, state: Path, node: Account) -> Account:
    """Refuse a layout the node user could read; returns the vault's owner (who runs the worker)."""
    if os.geteuid() != 0:
        raise PrivsepError(
            "--node-user needs root to start the SuperNode as that user and the training worker as the "
            f"vault's owner: run `sudo facefed-client start ... --node-user {node.name}`"
        )
    owner = owner_of(vault)
    if owner.uid == node.uid:
        raise PrivsepError(
            f"the vault {vault} is owned by the node user {node.name}; the node user must own nothing of "
            f"the site: give it to the site's own account (`chown -R OWNER {vault}`)"
        )
    for what, d in (("vault", vault), ("state", state)):
        st = d.stat()
        if st.st_uid != owner.uid:
            raise PrivsepError(
                f"the {what} directory {d} is owned by uid {st.st_uid}, the vault by {owner.name}: the "
                f"worker runs as the vault's owner and needs both (`chown -R {owner.name} {d}`)"
            )
        if stat.S_IMODE(st.st_mode) & 0o077:
            raise PrivsepError(
                f"the {what} directory {d} is readable by others (mode {stat.S_IMODE(st.st_mode):o}): "
                f"`chmod 700 {d}`, so that the node user {node.name} cannot read it"
            )
        if st.st_gid == node.gid or node.name in grp.getgrgid(st.st_gid).gr_mem:
            raise PrivsepError(f"the {what} directory {d} belongs to a group of the node user {node.name}")
    check_runnable(node, "node user")
    if owner.uid != 0:
        check_runnable(owner, "vault's owner")
    return owner


def blocked(path: Path, who: Account, need: int = 0o5) -> Path | None:
    """The first directory on the way to `path` (or `path` itself, needing `need` = r-x by default)
    that `who` cannot pass, by the mode bits that apply to it; None when it can."""
    groups = {who.gid, *(g.gr_gid for g in grp.getgrall() if who.name in g.gr_mem)}
    real = Path(os.path.realpath(path))
    for p, bits in [*((d, 0o1) for d in reversed(real.parents)), (real, need)]:
        st = p.stat()
        mode = st.st_mode >> 6 if st.st_uid == who.uid else st.st_mode >> 3 if st.st_gid in groups else st.st_mode
        if mode & bits != bits:
            return p
    return None


def check_runnable(who: Account, role: str) -> None:
    """The Python that runs facefed must be reachable by `who` (a pyenv under /root is not)."""
    for p in (Path(sys.executable), Path(sys.prefix)):
        stop = blocked(p, who)
        if stop is not None:
            raise PrivsepError(
                f"the {role} {who.name} cannot run {p} ({stop} is mode {stat.S_IMODE(stop.stat().st_mode):o}): "
                f"install facefed where every site user can execute it (e.g. a venv under /opt), or "
                f"`chmod o+x {stop}`"
            )


@dataclass(frozen=True)
class NodeDir:
    root: Path

    @property
    def node_config(self) -> Path:
        return self.root / NODE_CONFIG

    @property
    def ca_cert(self) -> Path:
        return self.root / CA_CERT

    @property
    def home(self) -> Path:
        return self.root / HOME

    @property
    def node_key(self) -> Path:
        return self.home / NODE_KEY

    @property
    def link(self) -> Path:
        return self.root / LINK


def prepare(
    root: Path, node: Account, owner: Account, *, config_text: str, ca_cert: Path | None, node_key: Path | None
) -> NodeDir:
    """Lay out NODE_DIR (see the module doc) afresh, with its owners and modes."""
    d = NodeDir(Path(root))
    if d.root.exists():  # it is chowned and its parts replaced: only ever a directory this code made
        foreign = sorted(p.name for p in d.root.iterdir() if p.name not in (NODE_CONFIG, CA_CERT, HOME, LINK))
        if foreign or not d.root.is_dir():
            raise PrivsepError(
                f"--node-dir {d.root} is not a node directory facefed made (it holds {', '.join(foreign[:3]) or 'a file'}); "
                "give a new or empty directory"
            )
    d.root.mkdir(parents=True, exist_ok=True)
    os.chown(d.root, 0, 0)
    d.root.chmod(0o755)
    for sub in (d.home, d.link):  # nothing of a previous start survives (a stale socket, an old key)
        if sub.exists():
            shutil.rmtree(sub)
    d.node_config.write_text(config_text)
    d.node_config.chmod(0o644)
    if ca_cert is not None:
        shutil.copyfile(ca_cert, d.ca_cert)
        d.ca_cert.chmod(0o644)
    d.home.mkdir(mode=0o700)
    if node_key is not None:
        shutil.copyfile(node_key, d.node_key)
        d.node_key.chmod(0o600)
    d.link.mkdir()
    os.chown(d.link, owner.uid, node.gid)
    d.link.chmod(0o2750)
    return d


def hand_over(d: NodeDir, node: Account) -> None:
    """Give USER its home (after the shim and key are written into it)."""
    for p in [d.home, *d.home.rglob("*")]:
        os.chown(p, node.uid, node.gid, follow_symlinks=False)


def adopt(dirs: list[Path], owner: Account) -> None:
    """Give the vault's owner what root wrote into its directories at this start (a pinned receipt
    key, the log directory): the worker, running as the owner, must be able to read and rewrite it."""
    for d in dirs:
        for base, subdirs, files in os.walk(d):
            for name in [base, *(os.path.join(base, n) for n in subdirs + files)]:
                if os.lstat(name).st_uid != owner.uid:
                    os.chown(name, owner.uid, owner.gid, follow_symlinks=False)


def share_key(path: Path, owner: Account, node: Account) -> None:
    """The worker's HMAC key: read by the worker (owner) and the ClientApps (USER's group) only."""
    os.chown(path, owner.uid, node.gid)
    path.chmod(0o640)
