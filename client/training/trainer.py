"""Local training at a site: DP-SGD (Opacus) with per-person Poisson sampling.

`train_local` trains the embedder's tail and the site's private margin head on the site's faces,
refusing before any step a call that would pass the site's privacy budget, and records every release
in the accountant. Why the guarantee is per person, what it relies on, what would break it, and why
the recipe is centring + DP linear probing + DP-BiTFiT: docs/privacy.md.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from opacus import GradSampleModule
from opacus.grad_sample import GradSampleModuleFastGradientClipping
from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
from opacus.validators import ModuleValidator
from torch import nn

from facefed.client.training.centering import dp_center
from facefed.client.training.dprandom import DPRandom
from facefed.client.training.faces import SiteFaces
from facefed.client.training.per_sample_grads import batch_grad  # (importing it registers fast PReLU / conv samplers)
from facefed.client.training.sampling import Batch, ImageSampler, PersonSampler
from facefed.common.accountant import SiteAccountant
from facefed.common.config import TrainConfig
from facefed.common.device import resolve_device
from facefed.common.model.heads import MarginHead
from facefed.common.model.mobilefacenet import MobileFaceNet, Tail, prefix_fingerprint
from facefed.common.model.stages import STAGES
from facefed.common.preprocess import to_input


@dataclass
class TrainProgress:
    phase: str  # "probe" (head only, frozen features) or "finetune"
    step: int  # steps done in this call (both phases)
    total: int
    loss: float  # running mean per-sample loss
    epsilon: float  # site epsilon after the steps done so far (inf when non-private)
    images_per_s: float


@dataclass
class TrainReport:
    steps: int  # DP-SGD steps taken (probe + fine-tune)
    probe_steps: int
    images: int  # per-sample gradients computed
    loss: float  # mean per-sample loss over the last 10% of steps
    epsilon: float  # the site's total epsilon after this call (inf: non-private)
    delta: float
    unit: str  # "person", "image" or "none"
    accountant: str  # "rdp" ("none" when non-private)
    noise_multiplier: float
    sample_rate: float
    wall_s: float
    images_per_s: float
    people_used: set[str] = field(default_factory=set)  # person ids sampled at least once
    center_shift: float | None = None  # norm of the DP centring shift, if this call centred (fresh head)

    def metrics(self) -> dict[str, float | int | str]:
        """Flat, JSON-able numbers (epsilon -1 when non-private) for logs and federation metrics."""
        return {
            "steps": self.steps,
            "probe_steps": self.probe_steps,
            "images": self.images,
            "loss": self.loss,
            "epsilon": self.epsilon if math.isfinite(self.epsilon) else -1.0,
            "delta": self.delta,
            "unit": self.unit,
            "accountant": self.accountant,
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "wall_s": self.wall_s,
            "people_used": len(self.people_used),
            "centered": self.center_shift is not None,
        }


# -- frozen prefix, computed once per image and its mirror -----------------------------------------
@torch.no_grad()
def prefix_features(model: MobileFaceNet, images: torch.Tensor, *, batch_size: int = 64) -> torch.Tensor | None:
    """(N, 2, C, H, W): frozen-prefix output of each uint8 image and of its mirror; None if no prefix."""
    if model.train_from == STAGES[0]:
        return None
    out = None
    dev = next(model.parameters()).device
    for i in range(0, len(images), batch_size):
        x = to_input(images[i : i + batch_size]).to(dev)
        f = torch.stack([model.forward_prefix(x), model.forward_prefix(x.flip(3))], 1).cpu()
        if out is None:
            out = torch.empty((len(images), *f.shape[1:]))
        out[i : i + len(f)] = f
    return out if out is not None else torch.empty(0)


def cached_prefix(model: MobileFaceNet, faces: SiteFaces) -> torch.Tensor | None:
    key = ("prefix", prefix_fingerprint(model))
    if key not in faces.cache:
        faces.cache.clear()  # an old prefix's features are useless now; free them
        faces.cache[key] = prefix_features(model, faces.images)
    return faces.cache[key]


class _Inputs:
    """Tail inputs for a batch: cached prefix features, or the images themselves when all layers train."""

    def __init__(self, model: MobileFaceNet, faces: SiteFaces):
        self.faces, self.feats = faces, cached_prefix(model, faces)
        self.device = next(model.parameters()).device

    def __call__(self, batch: Batch) -> torch.Tensor:
        if self.feats is None:
            return to_input(self.faces.images[batch.rows], batch.flips).to(self.device)
        return self.feats[batch.rows, batch.flips.long()].to(self.device)


class _Net(nn.Module):
    """Trainable tail followed by the head: the module whose per-sample gradients are clipped."""

    def __init__(self, model: MobileFaceNet, head: MarginHead):
        super().__init__()
        self.tail = Tail(model)
        self.head = head

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.head(self.tail(h))


class _BookkeepingGSM(GradSampleModuleFastGradientClipping):
    """Opacus ghost clipping (per-sample gradient norms from the first backward pass), then the clipped
    sum from the same pass's activations and backprops, scaled per sample ("book-keeping", Bu et al.
    2023), instead of Opacus' second backward pass through the whole tail."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self._kept: list[tuple[nn.Module, list[torch.Tensor], torch.Tensor]] = []

    def rearrange_grad_samples(self, *, module, backprops, loss_reduction, batch_first):
        activations, backprops = super().rearrange_grad_samples(
            module=module, backprops=backprops, loss_reduction=loss_reduction, batch_first=batch_first
        )
        self._kept.append((module, activations, backprops))
        return activations, backprops

    def set_clipped_grads(self) -> None:
        """p.grad = sum_i min(1, C / |g_i|) g_i for every trainable parameter."""
        coef = self.get_clipping_coef().detach()
        sums: dict[int, torch.Tensor] = {}
        params: dict[int, nn.Parameter] = {}
        for module, acts, g in self._kept:
            scaled = g * coef.view(-1, *[1] * (g.dim() - 1))
            for p, v in batch_grad(module, acts, scaled, samplers=self.GRAD_SAMPLERS).items():
                sums[id(p)] = sums[id(p)] + v if id(p) in sums else v
                params[id(p)] = p
        self._kept.clear()
        missed = [p for p in self.trainable_parameters if id(p) not in params]
        if missed:  # its .grad would still hold the UNclipped sum from the backward pass
            raise RuntimeError(f"no clipped gradient for a parameter of shape {tuple(missed[0].shape)}")
        for k, p in params.items():
            p.grad = sums[k].view_as(p)

    def forget(self) -> None:
        self._kept.clear()


# -- the Gaussian noise, from the release's CSPRNG ----------------------------------------------------
def _add_noise(opt: Any, rng: DPRandom, noise_multiplier: float) -> None:
    """p.grad = clipped sum + N(0, (sigma C)^2): the noise drawn by `rng` in float64, added in float64,
    and the sum rounded once to the parameter's dtype (client/training/dprandom.py: Mironov 2012)."""
    std = noise_multiplier * opt.max_grad_norm
    for p in opt.params:
        _check_processed_flag(p.summed_grad)
        total = p.summed_grad.double() + rng.gaussian_like(p.summed_grad, std) if std > 0 else p.summed_grad
        p.grad = total.to(p.summed_grad.dtype).view_as(p)
        _mark_as_processed(p.summed_grad)


class _SecureDPOptimizer(DPOptimizer):
    """Opacus' DPOptimizer (clipping, accounting hooks, scaling) with its torch-generator noise replaced."""

    def __init__(self, optimizer: torch.optim.Optimizer, *, rng: DPRandom, **kw: Any):
        super().__init__(optimizer, **kw)
        self.dp_rng = rng

    def add_noise(self) -> None:
        _add_noise(self, self.dp_rng, float(self.noise_multiplier))


class _SecureDPOptimizerGhost(DPOptimizerFastGradientClipping):
    """The same for ghost clipping's optimizer."""

    def __init__(self, optimizer: torch.optim.Optimizer, *, rng: DPRandom, **kw: Any):
        super().__init__(optimizer, **kw)
        self.dp_rng = rng

    def add_noise(self) -> None:
        sigma: Any = getattr(self, "_adjusted_noise_multiplier", self.noise_multiplier)
        _add_noise(self, self.dp_rng, float(sigma))


# -- one optimisation loop, private or not -----------------------------------------------------
class _Loop:
    def __init__(
        self,
        module: nn.Module,
        groups: list[dict],
        head: MarginHead,
        cfg: TrainConfig,
        sigma: float,
        expected_batch: float,
        rng: DPRandom,
        anchored: Sequence[nn.Parameter] = (),
    ):
        self.head, self.cfg, self.private = head, cfg, cfg.privacy_unit != "none"
        # Proximal pull toward the weights this call started from (pretrained or the round's global
        # model: public or earlier DP outputs), so it is data-independent and costs no privacy.
        self.anchors = [(p, p.detach().clone()) for p in anchored] if cfg.prox > 0 else []
        self.expected = max(expected_batch, 1e-9)
        self.device = next(module.parameters()).device
        opt = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        module.train()  # Opacus validates and captures activations only in training mode (no layer here
        #                 behaves differently in it: no dropout, no BatchNorm)
        self.ghost = self.private and cfg.clipping == "ghost"
        self.opt: Any  # an Opacus DP optimizer (untyped library) or, non-private, torch's SGD
        self.module: Any  # an Opacus GradSampleModule (an untyped library) or, non-private, the module itself
        if self.private:
            errors = ModuleValidator.validate(module, strict=False)
            if errors:
                raise ValueError(f"model is not valid for DP-SGD: {errors[0]}")
            # Loss is a sum; the optimizer divides (clipped sum + noise) by the EXPECTED batch size,
            # which (unlike the realised size) does not depend on who was sampled.
            dp: dict[str, Any] = dict(
                noise_multiplier=sigma,
                max_grad_norm=cfg.max_grad_norm,
                expected_batch_size=max(1, round(expected_batch)),
                loss_reduction="mean",
                rng=rng,  # the noise: AES-256-CTR under a fresh OS key, never torch's generator
            )
            if self.ghost:
                # Ghost clipping: per-sample gradient NORMS (the head's from |dL/dlogits| |x|, never
                # materialising B x people x 128), then the clipped sum from the kept backprops.
                self.module = _BookkeepingGSM(
                    module,
                    batch_first=True,
                    loss_reduction="sum",
                    max_grad_norm=cfg.max_grad_norm,
                    use_ghost_clipping=True,
                )
                self.opt = _SecureDPOptimizerGhost(opt, **dp)
            else:
                self.module = GradSampleModule(module, batch_first=True, loss_reduction="sum")
                self.opt = _SecureDPOptimizer(opt, **dp)
            self.params = [p for g in groups for p in g["params"]]
        else:
            self.module, self.opt = module, opt

    def step(self, x: torch.Tensor, labels: torch.Tensor) -> float:
        self.opt.zero_grad(set_to_none=True)
        loss_value = 0.0
        with warnings.catch_warnings():  # Opacus' full backward hooks on an input without grad: expected
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            if len(labels):
                if self.ghost:  # the first pass needs only backprops, not weight gradients: ask for d/dx
                    x = x.detach().requires_grad_(True)
                losses = self.head.loss(self.module(x), labels, reduction="none")
                loss_value = float(losses.detach().sum())
                if self.ghost:
                    torch.autograd.grad(losses.sum(), x)  # hooks record per-sample norms, activations, backprops
                    self.module.set_clipped_grads()  # p.grad = the clipped sum
                else:
                    (losses.sum() if self.private else losses.sum() / self.expected).backward()
        if self.private:
            if not len(labels):  # an empty Poisson batch still gets its noise
                for p in self.params:
                    if self.ghost:
                        p.grad = torch.zeros_like(p)
                    else:
                        p.grad_sample = torch.zeros((0, *p.shape), device=p.device)
            self.opt.step()
        elif len(labels):
            self.opt.step()
        with torch.no_grad():
            for p, anchor in self.anchors:
                p.sub_(self.cfg.prox * (p - anchor))
        self.head.renormalize()  # post-processing: keep rows on the unit sphere
        return loss_value

    def close(self) -> None:
        if self.private:
            self.module._close()
            for p in self.params:
                for attr in ("grad_sample", "summed_grad", "_norm_sample"):
                    if hasattr(p, attr):
                        delattr(p, attr)
        self.module.eval()


def _check(
    model: MobileFaceNet, head: MarginHead, faces: SiteFaces, cfg: TrainConfig, accountant: SiteAccountant | None
) -> None:
    cfg.check_people(faces.n_people, faces.n_images)
    if model.train_from != cfg.train_from:
        raise ValueError(
            f"the model trains from `{model.train_from}`, the config says train_from = "
            f"`{cfg.train_from}`; build the model with build_embedder(..., train_from=cfg.train_from)"
        )
    if cfg.privacy_unit == "none":
        if accountant is not None and accountant.unit != "none":
            raise ValueError(
                f"non-private training would void this site's per-{accountant.unit} guarantee "
                f"({accountant.path}); use a separate state for baselines"
            )
        return
    if accountant is None:
        raise ValueError(f"privacy_unit = {cfg.privacy_unit} needs the site's SiteAccountant")
    if accountant.unit != cfg.privacy_unit or accountant.delta != cfg.delta:
        raise ValueError(
            f"accountant {accountant.path} is per {accountant.unit} at delta {accountant.delta:g}; "
            f"the config says per {cfg.privacy_unit} at delta {cfg.delta:g}"
        )
    if head.scale != cfg.scale or head.margin != cfg.margin:
        raise ValueError(f"head has scale {head.scale}, margin {head.margin}; config says {cfg.scale}, {cfg.margin}")


def _given(value: float | None) -> float:
    """A config value that TrainConfig's validation guarantees for this branch (private training)."""
    assert value is not None
    return value


def train_local(
    model: MobileFaceNet,
    head: MarginHead,
    faces: SiteFaces,
    cfg: TrainConfig,
    accountant: SiteAccountant | None,
    *,
    insecure_seed: int | None = None,
    progress: Callable[[TrainProgress], None] | None = None,
    device: str | torch.device = "cpu",
) -> TrainReport:
    """Train `model`'s tail and `head` in place on `faces`; record the privacy spent; report.

    The DP randomness (Poisson sampling, image choice, flips, Gaussian noise) comes from one
    `DPRandom` for this call: AES-256-CTR under a fresh 256-bit `os.urandom` key
    (client/training/dprandom.py). `insecure_seed` fixes it, for benchmarks and tests ONLY: noise
    that an adversary can regenerate is no noise, and a replay that reused a release's noise would
    hand out the difference of the two, i.e. exactly the forgotten person's clipped gradients.

    `device` (cpu, cuda, or auto: cuda when available) runs the model and head there; the faces stay
    in CPU memory and both come back to the CPU at the end."""
    t0 = time.perf_counter()
    dev = resolve_device(device)
    rng = DPRandom() if insecure_seed is None else DPRandom.insecure_for_tests(insecure_seed)
    _check(model, head, faces, cfg, accountant)
    head.add_people(faces.pseudonyms)  # random, data-independent rows for newly enrolled people
    labels_of = head.indices(faces.pseudonyms)[faces.labels]  # image row -> head row
    person_of_row = faces.labels

    unit = cfg.privacy_unit
    if unit == "image":
        sampler: ImageSampler | PersonSampler = ImageSampler(faces.labels, cfg.sample_rate, flip=cfg.flip, rng=rng)
    else:  # person, and the non-private baseline on exactly the same kind of batches
        sampler = PersonSampler(faces.counts, cfg.sample_rate, flip=cfg.flip, rng=rng)
    fresh = not head.probed  # a fresh head gets the centring release and the probe steps
    probe = cfg.probe_steps if fresh else 0
    total = probe + cfg.steps
    center = fresh and cfg.center_noise is not None
    extra = cfg.fresh_head_events() if fresh else []  # the centring release, for the accountant

    # Privacy plan first: refuse before touching anything.
    sigma = 0.0
    if unit != "none":
        assert accountant is not None  # _check refused a private call without one
        sigma = (
            cfg.noise_multiplier
            if cfg.noise_multiplier is not None
            else accountant.noise_for(_given(cfg.target_epsilon), cfg.sample_rate, total, extra=extra)
        )
        accountant.plan(sigma, cfg.sample_rate, total, extra=extra)

    model.to(dev)
    head.to(dev)
    inputs = _Inputs(model, faces)
    done, n_images, used = 0, 0, torch.zeros(faces.n_people, dtype=torch.bool)
    losses: list[float] = []
    shift = None
    eps_cache = (0, accountant.epsilon() if accountant else 0.0)
    t_loop = time.perf_counter()

    def report(phase: str) -> None:
        nonlocal eps_cache
        if progress is None:
            return
        if done - eps_cache[0] >= max(1, total // 20) or done == total:
            eps_cache = (
                done,
                math.inf
                if unit == "none" or accountant is None
                else accountant.projected(sigma, cfg.sample_rate, done, extra=extra if shift is not None else ()),
            )
        recent = losses[-20:]
        progress(
            TrainProgress(
                phase,
                done,
                total,
                sum(recent) / max(1, len(recent)),
                eps_cache[1],
                n_images / max(1e-9, time.perf_counter() - t_loop),
            )
        )

    def run(loop: _Loop, steps: int, phase: str, x_of: Callable[[Batch], torch.Tensor]) -> None:
        nonlocal done, n_images
        try:
            for _ in range(steps):
                batch = sampler.sample()
                loss = loop.step(x_of(batch), labels_of[batch.rows].to(dev))
                done += 1
                n_images += len(batch)
                used[person_of_row[batch.rows]] = True
                losses.append(loss / max(1, len(batch)))
                report(phase)
        finally:
            loop.close()

    try:
        if center:
            # DP mean centring (client/training/centering.py): one Gaussian release, recorded below.
            shift = dp_center(
                model,
                faces,
                inputs.feats,
                unit="image" if unit == "image" else "person",
                clip=cfg.center_clip,
                noise_multiplier=_given(cfg.center_noise) if unit != "none" else 0.0,
                rng=rng,
            )
        if probe:
            # DP linear probing: the head learns on frozen embeddings (tail not trained here).
            with torch.no_grad():
                feats = inputs.feats if inputs.feats is not None else None
                emb = _embed_all(model, faces, feats)
            loop = _Loop(
                head,
                [{"params": list(head.parameters()), "lr": cfg.probe_lr}],
                head,
                cfg,
                sigma,
                sampler.expected_batch_size,
                rng,
            )
            run(loop, probe, "probe", lambda b: emb[b.rows, b.flips.long()])
        if center or probe:
            head.probed = True  # the fresh-head phase (centring, probe) is done: later calls skip it
        if cfg.steps:
            frozen_now: list[nn.Parameter] = []
            net = _Net(model, head)
            tail = [p for p in net.tail.parameters() if p.requires_grad]
            if cfg.tune == "bias":  # DP-BiTFiT: only the (folded-norm) biases move, few dimensions to noise
                tuned = {id(p) for n, p in net.tail.named_parameters() if n.endswith(".bias")}
                frozen_now = [p for p in tail if id(p) not in tuned]
                tail = [p for p in tail if id(p) in tuned]
            groups: list[dict[str, Any]] = [
                {"params": tail, "lr": cfg.lr},
                {"params": list(head.parameters()), "lr": cfg.head_lr},
            ]
            for p in frozen_now:
                p.requires_grad_(False)
            try:
                loop = _Loop(
                    net, groups, head, cfg, sigma, sampler.expected_batch_size, rng, anchored=groups[0]["params"]
                )
                run(loop, cfg.steps, "finetune", inputs)
            finally:
                for p in frozen_now:
                    p.requires_grad_(True)
    finally:
        # Whatever ran is recorded, even if the loop failed half-way.
        if accountant is not None and shift is not None:
            for event in extra:
                accountant.record(*event, label="train_local: mean centring")
        if accountant is not None and done:
            accountant.record(sigma, cfg.sample_rate, done, label="train_local: DP-SGD steps")
        model.eval().cpu()
        head.cpu()
    wall = time.perf_counter() - t0
    last = losses[-max(1, len(losses) // 10) :]
    return TrainReport(
        steps=done,
        probe_steps=probe,
        images=n_images,
        loss=sum(last) / max(1, len(last)),
        epsilon=math.inf if unit == "none" or accountant is None else accountant.epsilon(),
        delta=cfg.delta,
        unit=unit,
        accountant="none" if unit == "none" else "rdp",
        noise_multiplier=sigma,
        sample_rate=cfg.sample_rate,
        wall_s=wall,
        images_per_s=n_images / max(1e-9, time.perf_counter() - t_loop),
        people_used={faces.person_ids[k] for k in torch.nonzero(used).flatten().tolist()},
        center_shift=shift,
    )


@torch.no_grad()
def _embed_all(
    model: MobileFaceNet, faces: SiteFaces, feats: torch.Tensor | None, batch_size: int = 256
) -> torch.Tensor:
    """(N, 2, 128) embeddings of every image and its mirror with the current (frozen) model."""
    out = []
    dev = next(model.parameters()).device
    for i in range(0, faces.n_images, batch_size):
        if feats is None:
            x = to_input(faces.images[i : i + batch_size]).to(dev)
            out.append(torch.stack([model(x), model(x.flip(3))], 1))
        else:
            f = feats[i : i + batch_size].to(dev)
            out.append(model.forward_tail(f.flatten(0, 1)).view(len(f), 2, -1))
    return torch.cat(out) if out else torch.empty((0, 2, 128))
