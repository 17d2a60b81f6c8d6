"""Can sites of a given size move the model? In-process FedAvg over the demo's kind of sites.

    python bench/small_sites.py [--people 40] [--min-images 4] [--view2] [--seeds 2] [--only a,b] [--set K=V]
    python bench/small_sites.py --people 0 --min-images 2 --view2 --seeds 3 --only center   # the demo's sites

Three sites of disjoint peopleDevTrain people (demo/federation.py `pick_people`: `--people` each with
>= `--min-images` images, or all of them with `--people 0`; <= 8 images each, aligned as the vault
stores them), each site training with `train_local` exactly as a site does (a private head per site,
kept across rounds; per-person DP-SGD; the accountant per site), the server averaging the shared tail
weighted by people, LFW pairsDevTest (and with `--view2` the View 2 pairs of people no site holds)
after every round, aligned, flip averaging. No processes, TLS or vault: what is measured is only what
the federation's training recipe does to accuracy. Candidates are configs/federation.toml's [train]
with overrides (`--set` applies to all). Output also goes to bench-out/small_sites-PEOPLE.txt.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import tomllib
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench/train.py

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "demo"))

import torch  # noqa: E402
from federation import pick_people  # noqa: E402
from train import OUT, Tee  # noqa: E402
from train_data import derive, load_eval  # noqa: E402

from facefed.client.training.faces import faces_from_lfw  # noqa: E402
from facefed.client.training.trainer import prefix_features, train_local  # noqa: E402
from facefed.common.accountant import SiteAccountant  # noqa: E402
from facefed.common.config import TrainConfig  # noqa: E402
from facefed.common.lfw import LFW  # noqa: E402
from facefed.common.model.heads import MarginHead  # noqa: E402
from facefed.common.model.mobilefacenet import (  # noqa: E402
    build_embedder,
    load_shared_state,
    prefix_fingerprint,
    shared_state,
)
from facefed.common.paths import pretrained_path  # noqa: E402

BITFIT = {"train_from": "features", "tune": "bias"}
# (key, label, overrides of configs/federation.toml [train])
CANDIDATES = [
    ("file", "configs/federation.toml as is", {}),
    (
        "center",
        "DP centring + probe + DP-BiTFiT, lr 0.01",
        BITFIT | {"lr": 0.01, "center_noise": 5.0, "center_clip": 5.0, "probe_steps": 50},
    ),
    ("old", "before 13c: conv_5, all weights, lr 0.001", {"train_from": "conv_5", "tune": "all", "lr": 0.001}),
    ("bitfit", "DP-BiTFiT on `features`, lr 0.01", BITFIT | {"lr": 0.01}),
    ("bitfit-small", "DP-BiTFiT on `features`, lr 0.002", BITFIT | {"lr": 0.002}),
    ("bitfit-tiny", "DP-BiTFiT on `features`, lr 0.0005", BITFIT | {"lr": 0.0005}),
    # centring is refused below ~57 people per site at sigma 5 (TrainConfig.check_people): mostly noise
    (
        "nonprivate",
        "non-private, all of `features`, lr 0.05",
        {"privacy_unit": "none", "train_from": "features", "tune": "all", "lr": 0.05, "noise_multiplier": None},
    ),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--people", type=int, default=40, help="people per site; 0: all of them")
    ap.add_argument("--max-images", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--only", default=None, help="comma list of candidate keys")
    ap.add_argument("--min-images", type=int, default=4, help="people with at least this many images")
    ap.add_argument(
        "--view2", action="store_true", help="also score View 2 pairs.txt, the pairs with no site's person in them"
    )
    ap.add_argument("--set", action="append", default=[], help="KEY=VALUE override of [train] for every candidate")
    args = ap.parse_args()
    torch.set_num_threads(2)
    log = Tee(OUT / f"small_sites-{args.people}.txt")
    fed = tomllib.loads((ROOT / "configs" / "federation.toml").read_text())
    base = fed["train"]
    lfw, pretrained = LFW(), pretrained_path()
    split = pick_people(lfw, 3, args.people or None, min_images=args.min_images)
    sites = [faces_from_lfw(lfw, names, max_per_person=args.max_images) for names in split]
    extra = {k: tomllib.loads(f"v = {v}")["v"] for k, v in (kv.split("=", 1) for kv in args.set)}
    log(
        f"bench/small_sites.py: 3 sites x {'/'.join(str(len(n)) for n in split)} people (<= {args.max_images} images: "
        f"{', '.join(str(s.n_images) for s in sites)} images; {sum(len(s.skipped) for s in sites)} skipped, no face), "
        f"{args.rounds} rounds, {args.seeds} seeds; LFW pairsDevTest aligned, flip averaging"
    )
    conv5 = build_embedder(pretrained, train_from="conv_5")
    for s in sites:  # frozen-prefix features once per site, for both trainable stages
        f = prefix_features(conv5, s.images)
        s.cache[("prefix", prefix_fingerprint(conv5))] = f
        s.cache[("prefix", prefix_fingerprint(build_embedder(pretrained, train_from="features")))] = derive(
            conv5, f, "features"
        )
    evals = {"pairsDevTest": load_eval(lfw, pretrained, log=log)}
    if args.view2:
        evals["View 2 unseen"] = load_eval(lfw, pretrained, "pairs.txt", log=log, unseen=True)
    for test, evalc in evals.items():
        r0 = evalc.evaluate(build_embedder(pretrained))
        log(f"  {'pretrained as is, ' + test:<46} {100 * r0.accuracy_mean:6.2f}  AUC {r0.auc:.4f}")
    only = set(args.only.split(",")) if args.only else None
    weights = torch.tensor([s.n_people for s in sites], dtype=torch.float64)
    weights /= weights.sum()
    with tempfile.TemporaryDirectory(prefix="facefed-small-") as tmp:
        for key, label, over in CANDIDATES:
            if only is not None and key not in only:
                continue
            cfg = TrainConfig.model_validate({**base, **over, **extra})
            per_round: dict[str, list[list[tuple[float, float]]]] = {t: [[] for _ in range(args.rounds)] for t in evals}
            eps, t = 0.0, time.perf_counter()
            for seed in range(args.seeds):
                model = build_embedder(pretrained, train_from=cfg.train_from)
                heads = [MarginHead(scale=cfg.scale, margin=cfg.margin, seed=seed) for _ in sites]
                accs = []
                for k in range(len(sites)):
                    path = Path(tmp) / f"{key}-{seed}-{k}.json"
                    accs.append(
                        None
                        if cfg.privacy_unit == "none"
                        else SiteAccountant(path, cfg.delta, cfg.max_epsilon, cfg.privacy_unit)
                    )
                for rnd in range(args.rounds):
                    start = shared_state(model)
                    updates = []
                    for k, site in enumerate(sites):
                        load_shared_state(model, start)
                        report = train_local(
                            model, heads[k], site, cfg, accs[k], insecure_seed=1000 * seed + 10 * rnd + k
                        )
                        updates.append(shared_state(model))
                        eps = max(eps, report.epsilon)
                    avg = {n: sum(w * u[n].double() for w, u in zip(weights, updates)).float() for n in start}
                    load_shared_state(model, avg)
                    for test, evalc in evals.items():
                        r = evalc.evaluate(model)
                        per_round[test][rnd].append((100 * r.accuracy_mean, r.auc))
            privacy = "non-private" if cfg.privacy_unit == "none" else f"eps {eps:.2f}"
            log(f"  {key + ': ' + label}  {privacy} ({(time.perf_counter() - t) / args.seeds:.0f} s/seed)")
            for test in evals:
                cells = []
                for rnd, rs in enumerate(per_round[test], start=1):
                    a = [x[0] for x in rs]
                    cells.append(
                        f"r{rnd} {statistics.mean(a):6.2f} ± {statistics.stdev(a) if len(a) > 1 else 0:4.2f} "
                        f"(AUC {statistics.mean(x[1] for x in rs):.4f})"
                    )
                log(f"    {test:<20} {'  '.join(cells)}")


if __name__ == "__main__":
    main()
