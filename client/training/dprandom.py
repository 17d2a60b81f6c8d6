"""The DP randomness of a site: a cryptographically secure generator no one can regenerate.

Every random choice a DP release depends on (Poisson sampling of people or images, the image of a
sampled person, its flip, the Gaussian noise of DP-SGD and of the centring release) comes from one
`DPRandom` per release (one `train_local` call: a round, a replay round, a local run).

Construction: AES-256 in counter mode, keyed with 256 bits of fresh `os.urandom` (the OS CSPRNG) per
release, with a zero nonce (the key is never reused); its keystream is the random bit source. The
key lives only in this object's memory and is never written, logged or derived from anything the
server sends (the order's `seed` only initialises the data-independent head rows). Recovering the
noise therefore means recovering a 256-bit AES key from the released model, i.e. breaking AES.

What it replaces: torch's CPU generator (a Mersenne Twister seeded from one 64-bit integer; the old
code drew a 62-bit seed, but the attack in issue 11 enumerated seeds of a small space and stripped
the noise exactly). `tests/test_dprandom.py` runs that attack against both.

Numbers, all in float64:
  - uniforms: 53 random bits per number, u = k / 2^53 in [0, 1) (every value a multiple of 2^-53);
  - Gaussians: Box-Muller on two such uniforms (1 - u for the logarithm, so it is never log 0),
    computed and kept in float64 and cast to the parameter's dtype (float32) only when added;
  - Bernoulli(q): u < q; an integer below n: floor(u n) (bias <= n / 2^53, negligible).

Floating point (Mironov 2012, "On significance of the least significant bits for differential
privacy"; for the Gaussian: Jin et al. 2022, Haney et al. 2022): a textbook-float sampler's outputs
are not all floats, and which ones occur depends on the mean, so an observed noisy value can reveal
the exact unnoised value. What is and is not mitigated here, exactly:
  - mitigated: the attacks that first recover the generator's state or seed (the practical one:
    they strip the noise completely). There is no seed to guess and no state to reconstruct.
  - mitigated in part: the noise is sampled with 53-bit uniforms and float64 arithmetic, then rounded
    once to float32 when added to a float32 gradient sum (also float32, as Opacus computes it), and
    the result goes on through float32 optimiser arithmetic (momentum, learning rate, weight decay,
    prox) before anything is released. Rounding a float64 Gaussian to float32 maps about 2^29 float64
    values onto each float32, which removes the fine structure the published float64 attacks read;
    but this is an argument, not a proof: no formal bound is claimed for float32 rounding.
  - not done: Mironov's snapping mechanism or an exactly discrete Gaussian (Canonne, Kamath, Steinke
    2020) with a formal guarantee over the discretisation. Nor Opacus' `secure_mode`, which needs
    torchcsprng: archived by PyTorch, with no build for torch 2.x.
A released tail is also an average over sites and a post-processed sum of many steps; the
guarantee claimed is the ideal-real Gaussian one, with the caveat above.

Tests and benchmarks may fix the randomness with `DPRandom.insecure_for_tests(seed)` (and
`train_local(..., insecure_seed=...)`): the name says what it is; no production path passes one.
"""

from __future__ import annotations

import hashlib
import math
import os

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

KEY_BYTES = 32  # AES-256
MIN_KEY_BITS = 128


class DPRandom:
    """A stream of random numbers from AES-256-CTR under a fresh OS-random key (see the module doc)."""

    def __init__(self, key: bytes | None = None, *, _insecure: bool = False):
        if key is None:
            key = os.urandom(KEY_BYTES)
        elif not _insecure:
            raise ValueError("DPRandom takes its key from os.urandom; fixed keys are for tests only")
        if len(key) * 8 < MIN_KEY_BITS or len(key) != KEY_BYTES:
            raise ValueError(f"DPRandom needs a {KEY_BYTES * 8}-bit key")
        self.key_bits = len(key) * 8
        self.insecure = _insecure
        self._enc = Cipher(algorithms.AES(key), modes.CTR(b"\0" * 16)).encryptor()

    @classmethod
    def insecure_for_tests(cls, seed: int | str | bytes) -> DPRandom:
        """A reproducible generator for tests and benchmarks ONLY: anyone who knows `seed` can
        regenerate every noise draw and sampling decision, i.e. there is no privacy at all."""
        return cls(hashlib.sha256(b"facefed insecure test seed\0" + str(seed).encode()).digest(), _insecure=True)

    # -- raw material ------------------------------------------------------------------------------
    def bytes(self, n: int) -> bytes:
        return self._enc.update(b"\0" * n)

    def _u53(self, n: int) -> np.ndarray:
        """n integers uniform in [0, 2^53)."""
        raw = np.frombuffer(self.bytes(8 * n), dtype=np.uint64) if n else np.zeros(0, np.uint64)
        return raw >> np.uint64(11)

    # -- numbers (float64) ---------------------------------------------------------------------------
    def uniform(self, n: int) -> np.ndarray:
        """n float64 uniforms in [0, 1), multiples of 2^-53."""
        return self._u53(n).astype(np.float64) * (2.0**-53)

    def bernoulli(self, n: int, p: float) -> torch.Tensor:
        """Bool tensor (n,): each True with probability p."""
        return torch.from_numpy(self.uniform(n) < p)

    def below(self, bounds: torch.Tensor) -> torch.Tensor:
        """Long tensor: for each bound b > 0, an integer uniform in [0, b)."""
        u = torch.from_numpy(self.uniform(len(bounds)))
        return torch.minimum((u * bounds.double()).long(), bounds.long() - 1)

    def normal(self, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
        """Standard Gaussian float64 tensor of `shape` (Box-Muller on 53-bit uniforms)."""
        n = math.prod(shape)
        half = (n + 1) // 2
        u = self.uniform(2 * half)
        r = np.sqrt(-2.0 * np.log1p(-u[:half]))  # log(1 - u): u < 1, so never log 0
        theta = 2.0 * math.pi * u[half:]
        z = np.concatenate([r * np.cos(theta), r * np.sin(theta)])[:n]
        return torch.from_numpy(z).view(*shape)

    def gaussian_like(self, reference: torch.Tensor, std: float) -> torch.Tensor:
        """N(0, std^2) noise of `reference`'s shape and device, drawn and scaled in float64 (cast by the caller)."""
        return (self.normal(reference.shape) * float(std)).to(reference.device)
