"""`facefed-server simulate`: the same ServerApp and ClientApp on Flower's simulation engine.

A SuperLink is started with `--simulation` (no TLS: nothing leaves this machine) and the run is
submitted with `flwr run`, exactly like a deployment; Flower then runs N virtual SuperNodes on Ray
instead of waiting for real ones. A virtual site's people are its share of LFW peopleDevTrain
(`common.lfw.partition_people`, people with >= 2 images), read straight from the archive; its head,
accountant and contribution log live under STATE/sites/<site>. The ledger, checkpoints and
evaluation are the deployment's own, so `facefed-server status --state STATE` reads a simulation too.
Needs the `simulation` extra (ray).
"""

from __future__ import annotations

import signal
import socket
import subprocess
from pathlib import Path

from facefed.common.childproc import die_with_parent, flower_env
from facefed.common.errors import FacefedError
from facefed.common.fedconfig import FederationConfig
from facefed.server.ops.progress import follow, submit
from facefed.server.ops.submission import new_run_id, write_submission
from facefed.server.ops.superlink import wait_listening
from facefed.server.state import CONNECTION, StatePaths


class SimulationError(FacefedError, RuntimeError):
    """The simulation could not run; the message says why."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_sim_connection(paths: StatePaths, port: int, sites: int, cpus: int) -> None:
    paths.flwr_home.mkdir(parents=True, exist_ok=True)
    paths.flwr_config.write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\naddress = "127.0.0.1:{port}"\n'
        f"insecure = true\n\n[superlink.{CONNECTION}.options]\nnum-supernodes = {sites}\n\n"
        f"[superlink.{CONNECTION}.options.backend.client-resources]\nnum-cpus = 1\n\n"
        f"[superlink.{CONNECTION}.options.backend.init-args]\nnum-cpus = {cpus}\n"
    )


def run_simulation(
    cfg: FederationConfig,
    *,
    sites: int,
    state: Path,
    lfw: str,
    pretrained: str,
    people_per_site: int | None = None,
    max_images: int | None = None,
    cpus: int = 2,
    timeout: float = 0.0,
    quiet: bool = False,
) -> str:
    """Run one simulated training run to the end; returns the ledger run id."""
    try:
        import ray  # noqa: F401
    except ImportError:
        raise SimulationError("simulation needs ray: pip install 'facefed[simulation]'") from None
    if cfg.min_sites > sites:
        raise SimulationError(
            f"the config needs min_sites={cfg.min_sites} but only {sites} virtual sites were asked for"
        )
    paths = StatePaths.at(state, create=True)
    port = free_port()
    write_sim_connection(paths, port, sites, cpus)
    cmd = [
        "flower-superlink",
        "--simulation",
        "--insecure",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--database",
        str(paths.superlink_db),
        "--disable-runtime-dependency-installation",
    ]
    env = flower_env(paths.flwr_home, {"RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0"})
    log = open(paths.logs / "simulation-superlink.log", "a")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        cmd, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, preexec_fn=die_with_parent
    )
    try:
        if not wait_listening("127.0.0.1", port, 90):
            raise SimulationError(
                f"the simulation SuperLink did not start; see {paths.logs / 'simulation-superlink.log'}"
            )
        run_id = new_run_id(cfg)
        sub = write_submission(paths, cfg, run_id=run_id, resume=False, lfw=lfw, pretrained=pretrained)
        flwr_run = submit(
            paths,
            sub,
            {
                "sim-state": str(paths.root),
                "sim-lfw": lfw,
                "sim-pretrained": pretrained,
                "sim-people": int(people_per_site or 0),
                "sim-max-images": int(max_images or 0),
            },
        )
        code = follow(paths, run_id, flwr_run, timeout=timeout, quiet=quiet)
        if code != 0:
            raise SimulationError(
                f"simulated run {run_id} did not complete; `facefed-server status --state "
                f"{paths.root}` and {paths.logs} say why"
            )
        return run_id
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
