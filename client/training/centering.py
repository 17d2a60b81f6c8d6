"""DP mean centring: the embedding's common offset, released with the Gaussian mechanism.

Why: the pretrained CASIA embedder's embeddings of the sites' faces share an offset (their mean, in
the embedding layer's output before L2 normalisation, is about a quarter of a typical embedding's
norm). Subtracting it spreads people over the sphere; on held-out peopleDevTrain people it gains
about 1 point of verification accuracy, most of what non-private fine-tuning gains, for a small
part of a per-person budget (bench/tune.py). DP-SGD can learn the same shift (DP-BiTFiT), but only
through noisy head rows and at far greater cost.

The mechanism, per privacy unit u (a person: the mean over their images and mirrors; an image: the
mean over its views):
    z_u = mean pre-normalisation embedding of u, clipped to L2 norm C (`center_clip`)
    S   = sum_u z_u + N(0, (sigma C)^2 I)                   sigma = `center_noise`
    bias of the embedding layer -= S / U                     U = number of enrolled units
Adding or removing one unit changes the sum by at most C, so S is the Gaussian mechanism with
noise multiplier sigma: RDP alpha / (2 sigma^2), which the site's accountant records as one step at
sample rate 1 (Opacus' RDP analysis reduces to exactly that). U, the size of the enrolment roster,
is treated as public, as for the head (client/training/trainer.py; docs/privacy.md). The bias update is post-processing, and
the weights it starts from are public (pretrained) or earlier DP outputs, as every DP step needs.
The noise comes from the release's DPRandom (client/training/dprandom.py: AES-256-CTR under a fresh
OS-random key), drawn and added in float64 and rounded once to the bias's dtype.
"""

from __future__ import annotations

import torch

from facefed.client.training.dprandom import DPRandom
from facefed.client.training.faces import SiteFaces
from facefed.common.errors import FacefedError
from facefed.common.model.mobilefacenet import MobileFaceNet
from facefed.common.preprocess import to_input


class CenteringError(FacefedError, ValueError):
    """Centring asked of a model or site where it cannot run; the message says why."""


@torch.no_grad()
def unit_means(
    model: MobileFaceNet, faces: SiteFaces, feats: torch.Tensor | None, unit: str, batch_size: int = 512
) -> torch.Tensor:
    """(U, d) mean pre-normalisation embedding per unit (person, or image for unit "image")."""
    z = []
    dev = next(model.parameters()).device
    for i in range(0, faces.n_images, batch_size):
        if feats is not None:
            f = feats[i : i + batch_size].to(dev)
            z.append(model.forward_tail(f.flatten(0, 1), normalize=False).view(len(f), f.shape[1], -1).mean(1))
        else:
            x = to_input(faces.images[i : i + batch_size]).to(dev)
            z.append((model.forward_tail(x, normalize=False) + model.forward_tail(x.flip(3), normalize=False)) / 2)
    per_image = torch.cat(z).cpu()
    if unit == "image":
        return per_image
    sums = torch.zeros((faces.n_people, per_image.shape[1]), dtype=per_image.dtype).index_add_(
        0, faces.labels, per_image
    )
    return sums / faces.counts.clamp_min(1).unsqueeze(1).to(per_image.dtype)


@torch.no_grad()
def dp_center(
    model: MobileFaceNet,
    faces: SiteFaces,
    feats: torch.Tensor | None,
    *,
    unit: str,
    clip: float,
    noise_multiplier: float,
    rng: DPRandom,
) -> float:
    """Subtract the DP mean of the units' embeddings from the embedding layer's bias; returns the norm
    of the shift applied."""
    bias = model.features.bias
    if bias is None:
        raise CenteringError(
            "centring needs the folded-norm embedder (its embedding layer has a bias); "
            "leave center_noise unset for a GroupNorm model trained from scratch"
        )
    means = unit_means(model, faces, feats, unit)
    if not len(means):
        raise CenteringError("no faces to centre on")
    scale = (clip / means.norm(dim=1, keepdim=True).clamp_min(1e-12)).clamp(max=1.0)
    total = (means * scale).sum(0)
    if noise_multiplier > 0:
        total = (total.double() + rng.gaussian_like(total, noise_multiplier * clip)).to(total.dtype)
    shift = total / len(means)
    bias.sub_(shift.view_as(bias).to(bias.device))
    return float(shift.norm())
