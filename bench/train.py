"""Benchmark: DP-SGD cost and accuracy of the face embedder (issue 3). Run: `make bench` or
`.venv/bin/python bench/train.py` with FACEFED_LFW and FACEFED_PRETRAINED set.

1. Throughput: DP-SGD (per-person, Opacus) vs non-private SGD on the same model (trainable tail +
   CosFace head), the same batches of the same images, interleaved in one run; images/s and ratio.
2. Accuracy on LFW pairsDevTest (people disjoint from training; 10-fold CV thresholds, flip
   averaging; `--pairs pairs.txt --disjoint` for the View 2 pairs of people not trained on),
   training on peopleDevTrain people with >= 2 images, aligned as the vault stores them (images
   with no detected face skipped, and counted; evaluation is aligned too): pretrained as is; fine-tuned
   non-private; fine-tuned with per-person DP at epsilon 8 and 2 (delta 1e-5, RDP); from scratch
   non-private and DP (time-boxed: a few minutes each on 2 cores).
Hyper-parameters come from configs/bench/*.toml, chosen on held-out peopleDevTrain people by
bench/tune.py, never on pairsDevTest. Output is also written to
bench-out/train.txt.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

# On a shared, oversubscribed machine OpenMP worker threads that spin while waiting for a descheduled
# peer slow torch down 10-100x; passive waiting keeps 2 threads useful. Must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402
from train_data import load_eval, load_faces  # noqa: E402

from facefed.client.training.dprandom import DPRandom
from facefed.client.training.sampling import PersonSampler  # noqa: E402
from facefed.client.training.trainer import _Loop, _Net, train_local  # noqa: E402
from facefed.common.accountant import SiteAccountant  # noqa: E402
from facefed.common.config import TrainConfig, load_config  # noqa: E402
from facefed.common.evaluate import EvalCache  # noqa: E402
from facefed.common.lfw import LFW  # noqa: E402
from facefed.common.model.heads import MarginHead  # noqa: E402
from facefed.common.model.mobilefacenet import build_embedder, count_params, prefix_fingerprint  # noqa: E402
from facefed.common.paths import pretrained_path  # noqa: E402

OUT = ROOT / "bench-out"
CONFIGS = ROOT / "configs" / "bench"


class Tee:
    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.f = open(path, "w")  # noqa: SIM115 - a log kept open for the whole benchmark

    def __call__(self, *args) -> None:
        line = " ".join(str(a) for a in args)
        print(line, flush=True)
        self.f.write(line + "\n")
        self.f.flush()


def throughput(model, faces, log, *, batch: int, rounds: int, steps: int) -> None:
    """Same model, same batches, same images: DP and non-private steps interleaved."""
    q = batch / faces.n_people
    sampler = PersonSampler(faces.counts, q, rng=DPRandom.insecure_for_tests(0))
    batches = [sampler.sample() for _ in range(steps)]
    feats = faces.cache[("prefix", prefix_fingerprint(model))]
    xs = [feats[b.rows, b.flips.long()] for b in batches]
    head = MarginHead(faces.pseudonyms)
    labels = [head.indices(faces.pseudonyms)[faces.labels[b.rows]] for b in batches]
    n_images = sum(len(b) for b in batches)
    timings = {"none": 0.0, "person": 0.0}
    for r in range(rounds + 1):  # round 0 warms up
        for unit in ("none", "person"):
            cfg = TrainConfig(
                privacy_unit=unit,
                noise_multiplier=1.0 if unit != "none" else None,
                sample_rate=q,
                lr=1e-4,
                head_lr=1e-4,
            )
            net = _Net(model, head)
            groups = [
                {"params": [p for p in net.tail.parameters() if p.requires_grad], "lr": cfg.lr},
                {"params": list(head.parameters()), "lr": cfg.head_lr},
            ]
            loop = _Loop(net, groups, head, cfg, 1.0, q * faces.n_people, DPRandom.insecure_for_tests(r))
            t = time.perf_counter()
            for x, y in zip(xs, labels):
                loop.step(x, y)
            if r:
                timings[unit] += time.perf_counter() - t
            loop.close()
    ips = {u: rounds * n_images / s for u, s in timings.items()}
    log(
        f"  [{model.train_from}] trainable: {model.train_from}..features ({count_params(model, True):,} params) + head "
        f"({len(head)} x 128); batches of ~{batch} people (mean {n_images / steps:.0f}), {steps} steps x {rounds} rounds"
    )
    log(f"  non-private SGD : {ips['none']:8.1f} images/s")
    log(f"  DP-SGD (Opacus) : {ips['person']:8.1f} images/s")
    log(f"  DP cost ratio   : {ips['none'] / ips['person']:.2f}x  (target <= 2x)")


def run_row(name, model, faces, cfg: TrainConfig, evalc, log, seed: int = 0):
    head = MarginHead(faces.pseudonyms, scale=cfg.scale, margin=cfg.margin, seed=seed)
    acc = None
    if cfg.privacy_unit != "none":
        path = OUT / "state" / f"accountant-{name.replace(' ', '_')}.json"
        path.unlink(missing_ok=True)
        acc = SiteAccountant(path, cfg.delta, cfg.max_epsilon, cfg.privacy_unit)
    report = train_local(model, head, faces, cfg, acc, insecure_seed=seed)
    t = time.perf_counter()
    result = evalc.evaluate(model) if evalc is not None else None
    return report, result, time.perf_counter() - t


def fmt_row(name, results, reports=None, train_s=None) -> str:
    """One table row: the mean over seeds (the DP noise and sampling differ per seed), the spread
    over seeds, and for a single result the spread over the 10 folds; `errors`: pairs misclassified at
    the cross-validated thresholds (mean over seeds), the resolution of the accuracy figure."""
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    accs = [100 * r.accuracy_mean for r in results]
    errors = mean([r.n_pairs * (1 - r.accuracy_mean) for r in results])
    spread = statistics.stdev(accs) if len(accs) > 1 else 100 * results[0].accuracy_std
    tar = {far: mean([100 * r.tar_at_far[far].tar for r in results]) for far in (1e-2, 1e-3)}
    report = reports[0] if reports else None
    if report is None:
        priv, steps = "-", "-"
    elif report.unit == "none":
        priv, steps = "non-private", f"{report.steps}"
    else:
        priv, steps = f"eps={report.epsilon:.2f} (sigma {report.noise_multiplier:.2f})", f"{report.steps}"
    seeds = f"  seeds: {', '.join(f'{a:.1f}' for a in accs)}" if len(accs) > 1 else ""
    return (
        f"  {name:<30} {mean(accs):6.2f} ± {spread:4.2f}  {errors:6.1f}  {mean([r.auc for r in results]):.4f}  "
        f"{tar[1e-2]:6.1f}  {tar[1e-3]:6.1f}  {steps:>6}  "
        f"{'' if train_s is None else f'{train_s:6.0f}'}  {priv}{seeds}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--skip-scratch", action="store_true", help="leave out the from-scratch rows")
    ap.add_argument("--only", default=None, help="comma list of rows: pretrained,nonprivate,dp8,dp2,scratch,scratch_dp")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seeds", type=int, default=3, help="training seeds per fine-tuned row (mean and spread)")
    ap.add_argument(
        "--pairs", default="pairsDevTest.txt", help="pairsDevTest.txt, or pairs.txt (View 2) for the final figure"
    )
    ap.add_argument("--skip-throughput", action="store_true", help="leave out part 1")
    ap.add_argument(
        "--disjoint",
        action="store_true",
        help="score only the pairs whose two people are not training people (View 2 shares people with "
        "peopleDevTrain: 2,803 of its 6,000 pairs remain, in their official folds)",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    stem = "train" if args.pairs == "pairsDevTest.txt" else f"train-{Path(args.pairs).stem}"
    log = Tee(OUT / f"{stem}{'-disjoint' if args.disjoint else ''}.txt")
    t_all = time.perf_counter()
    log(
        f"bench/train.py  torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores at start"
    )
    lfw = LFW()
    pretrained = pretrained_path()
    model = build_embedder(pretrained)  # train_from = "features", the recipe's trainable stage
    names = lfw.trainable_people()
    log("training people: peopleDevTrain with >= 2 images")
    faces = load_faces(lfw, names, pretrained, log=log)
    evalc = load_eval(lfw, pretrained, args.pairs, log=log, unseen=args.disjoint)

    if not args.skip_throughput:
        log("\n1. Throughput: DP-SGD vs non-private SGD (same model, batches and images; frozen prefix cached)")
        dp8 = load_config(CONFIGS / "finetune-dp8.toml", TrainConfig)
        batch = round(dp8.sample_rate * faces.n_people)  # the benchmark recipe's expected batch
        for train_from, steps in (("features", 20), ("conv_5", 3)):
            model_t = build_embedder(pretrained, train_from=train_from)
            throughput(model_t, faces, log, batch=batch, rounds=3, steps=steps)

    only = set(args.only.split(",")) if args.only else None
    want = lambda k: only is None or k in only  # noqa: E731
    n_pairs, n_imp = len(evalc.same), int((~evalc.same).sum())
    log(
        f"\n2. Accuracy on LFW {args.pairs}, aligned ({n_pairs:,} pairs{' of people disjoint from training' if args.disjoint or args.pairs == 'pairsDevTest.txt' else ''}; 10-fold CV "
        f"thresholds; flip averaging; TAR over the {n_imp} impostor pairs: FAR 1e-2 admits {int(1e-2 * n_imp)} of them, "
        f"1e-3 admits {int(1e-3 * n_imp)}).\n   Fine-tuned rows: mean over {args.seeds} seeds ± sd over seeds; other rows: "
        "± sd over the 10 folds. errors: misclassified pairs. train s: per seed."
    )
    log(
        f"  {'model':<30} {'acc %':>14}  {'errors':>6}  {'AUC':>6}  {'TAR@1e-2':>6}  {'@1e-3':>6}  {'steps':>6}  "
        f"{'train s':>6}  privacy"
    )
    if want("pretrained"):
        log(fmt_row("pretrained (CASIA) as is", [evalc.evaluate(model)]))
    rows = [
        ("nonprivate", "fine-tuned, non-private", "finetune-nonprivate.toml"),
        ("dp8", "fine-tuned, DP person eps 8", "finetune-dp8.toml"),
        ("dp2", "fine-tuned, DP person eps 2", "finetune-dp2.toml"),
    ]
    for key, name, file in rows:
        if not want(key):
            continue
        cfg = load_config(CONFIGS / file, TrainConfig)
        reports, results, t = [], [], time.perf_counter()
        for seed in range(args.seeds):
            m = build_embedder(pretrained, train_from=cfg.train_from)
            report, result, _ = run_row(name, m, faces, cfg, evalc, log, seed=seed)
            reports.append(report)
            results.append(result)
        log(fmt_row(name, results, reports, (time.perf_counter() - t) / args.seeds))
    if not args.skip_scratch:
        scratch_faces = None
        for key, name, file in [
            ("scratch", "from scratch, non-private", "scratch-nonprivate.toml"),
            ("scratch_dp", "from scratch, DP person eps 8", "scratch-dp8.toml"),
        ]:
            if not want(key):
                continue
            cfg = load_config(CONFIGS / file, TrainConfig)
            m = build_embedder(None, train_from="conv1")
            if scratch_faces is None:
                scratch_faces = faces.subset(faces.person_ids)
                scratch_faces.cache.clear()
            scratch_eval = EvalCache(lfw, args.pairs, flip=True)
            t = time.perf_counter()
            report, result, _ = run_row(name, m, scratch_faces, cfg, scratch_eval, log)
            log(fmt_row(name, [result], [report], time.perf_counter() - t))
    log(
        f"\nper-person epsilon at delta 1e-5, RDP accountant (Opacus analysis); whole benchmark "
        f"{(time.perf_counter() - t_all) / 60:.1f} min; load average {os.getloadavg()[0]:.1f} at the end"
    )


if __name__ == "__main__":
    main()
