"""A live collapse alarm: statistics of the online projections, kept on the device.

BYOL has no negatives: nothing in its loss forbids mapping every image to the same
vector, and with some backbones and recipes (e.g. mobile timm nets under Adam at a
constant learning rate) training does degenerate while the loss keeps falling. The
:class:`CollapseMonitor` that ``BYOL`` owns (``collapse_alarm=True``, the default)
measures every training step, on the device and without a host sync, how spread out the
L2-normalised online projections are, and ``BYOL.update_moving_average()`` (SimSiam: the
forward) reads the figures back where it already reads its deferred non-finite flags: at
once on the CPU, else from a pinned copy of an earlier step once its CUDA event has
completed, never by blocking. A lasting near-total collapse raises one
:class:`CollapseWarning` per learner (again only after a recovery).

The figures, shared with :func:`byol_pytorch.training.evaluate.collapse_report`:

* :func:`embedding_std`: per-dimension std of the L2-normalised rows, averaged over the
  dimensions (SimSiam, Chen & He 2021, Sec. 4.1): about 1/sqrt(D) for unit vectors spread
  over the sphere, 0 for a single vector.
* :func:`effective_rank`: exp of the entropy of the normalised singular values (Roy &
  Vetterli 2007), uncentred as in RankMe (Garrido et al. 2023): about how many directions
  the rows use. Eigen-solvers check their status on the host (a sync on CUDA), so the
  training step only keeps a small sample of the last batch's projections on the device;
  the rank is computed from it when the figures are read (:meth:`CollapseMonitor.status`,
  or the warning).

Thresholds: the alarm fires when the std stays below ``0.1 / sqrt(D)`` (a tenth of the
healthy figure) for ``window = 50`` steps in a row: a near-total collapse (about a constant
plus 10% noise), which no useful run reaches, lasting long enough to rule out a dip. Milder,
dimensional collapse is not alarmed: read the effective rank in :meth:`CollapseMonitor.status`
(``byol-pytorch train`` logs both). The measurements behind the bound are in docs/DESIGN.md
("A live collapse alarm") and benchmarks/results/robustness.md.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._host_read import DeferredRead
from ._modules import kept_through_apply

__all__ = ["CollapseWarning", "CollapseMonitor", "embedding_std", "effective_rank"]

# Alarm when std < STD_FACTOR / sqrt(D) for WINDOW steps in a row (see above).
STD_FACTOR = 0.1
WINDOW = 50
SAMPLE_ROWS = 64  # rows of the last batch kept for the effective rank

# Layout of CollapseMonitor.stats.
_STD, _LOW_STEPS, _LOW_PEAK, _STEPS, _ROWS = range(5)


class CollapseWarning(UserWarning):
    """The online projections have collapsed to (nearly) one vector during training.

    ``warnings.simplefilter("error", CollapseWarning)`` turns it into an exception.
    """


def embedding_std(embeddings: Tensor) -> Tensor:
    """Per-dimension std (population) of the L2-normalised rows, averaged over dimensions.

    Args:
        embeddings: (N, D), N >= 1.

    Returns:
        A 0-d tensor on the input's device (no host read): about 1/sqrt(D) for spread
        unit vectors, 0 when every row points the same way.
    """
    z = F.normalize(embeddings, dim=1)  # (N, D)
    return z.std(dim=0, unbiased=False).mean()


def effective_rank(embeddings: Tensor) -> Tensor:
    """exp(entropy of the normalised singular values) of the L2-normalised rows.

    Singular values below ``max * sqrt(max(N, D) * eps)`` (the noise floor of an
    eigen-solve of the Gram matrix) are dropped; all-zero rows give 0.

    Args:
        embeddings: (N, D); float64 for figures to compare across runs.

    Returns:
        A 0-d tensor on the input's device, between 1 and min(N, D) (0 for zeros).
    """
    z = F.normalize(embeddings, dim=1)
    n, dim = z.shape
    gram = z.T @ z if dim <= n else z @ z.T  # (m, m), m = min(N, D)
    singular = torch.linalg.eigvalsh(gram).clamp_min(0).sqrt()  # (m,)
    tolerance = singular.max() * math.sqrt(max(n, dim) * torch.finfo(z.dtype).eps)
    singular = torch.where(singular > tolerance, singular, 0)
    total = singular.sum()
    p = singular / total.clamp_min(torch.finfo(z.dtype).tiny)
    entropy = -torch.special.xlogy(p, p).sum()
    return torch.where(total > 0, entropy.exp(), torch.zeros_like(entropy))


class CollapseMonitor(nn.Module):
    """Device-side statistics of a learner's online projections, and the alarm on them.

    ``observe`` runs in the training forward (tensor ops only: no host read, no graph
    break); ``poll`` reads an earlier step's figures without blocking and warns;
    ``status`` reads the latest ones (a host read: call it at log steps).

    Args:
        dim: width D of the projections.
        std_factor: alarm below ``std_factor / sqrt(D)``.
        window: ... for this many training steps in a row.

    Attributes ``window`` and ``bound`` may be changed after construction. The buffers
    are not persistent (checkpoints neither hold nor need them) and are in DDP's ignore
    list (each rank measures its own batch).
    """

    stats: Tensor
    sample: Tensor

    def __init__(self, dim: int, std_factor: float = STD_FACTOR, window: int = WINDOW):
        super().__init__()
        self.dim = int(dim)
        self.bound = float(std_factor) / math.sqrt(self.dim)
        self.window = int(window)
        # [std of the last step, steps in a row below the bound, highest std over those
        # steps, training steps observed, rows in ``sample``]
        self.register_buffer("stats", torch.zeros(5, dtype=torch.float32), persistent=False)
        self.register_buffer("sample", torch.zeros(SAMPLE_ROWS, self.dim, dtype=torch.float32), persistent=False)
        self._reader = DeferredRead()
        self._alarmed = False
        self.last: dict[str, float] | None = None  # the figures last read by ``poll``

    @property
    def healthy_std(self) -> float:
        """1/sqrt(D): the std of unit vectors spread evenly over the sphere."""
        return 1.0 / math.sqrt(self.dim)

    @torch.no_grad()
    def observe(self, *projections: Tensor) -> None:
        """Record one training step: the mean std over the views' (B, D) projections."""
        stats = self.stats
        zs = [p.detach().float() for p in projections]
        std = torch.stack([embedding_std(z) for z in zs]).mean().to(stats.dtype)
        low = std < self.bound
        low_steps = torch.where(low, stats[_LOW_STEPS] + 1, 0)
        low_peak = torch.where(low, torch.maximum(stats[_LOW_PEAK], std), 0)
        rows = min(SAMPLE_ROWS, zs[0].shape[0])
        self.sample[:rows].copy_(F.normalize(zs[0][:rows], dim=1))
        rows_t = torch.full_like(std, rows)
        stats.copy_(torch.stack([std, low_steps, low_peak, stats[_STEPS] + 1, rows_t]))

    def poll(self) -> None:
        """Judge the figures of an earlier step where that needs no wait; may warn.

        On the CPU the current figures are read (free); on CUDA an earlier step's, once their
        copy has landed (``_host_read.DeferredRead``); elsewhere nothing is read (use ``status()``).
        """
        values = self._reader.poll(self.stats)
        if values is not None:
            self._judge(values)

    def _judge(self, values: list[float]) -> None:
        std, low_steps, low_peak, steps = values[_STD], values[_LOW_STEPS], values[_LOW_PEAK], values[_STEPS]
        self.last = {"std": std, "low_steps": low_steps, "steps": steps}
        if steps == 0 or low_steps == 0:
            self._alarmed = False  # healthy (again): a later collapse warns anew
        elif low_steps >= self.window and not self._alarmed:
            self._alarmed = True
            warnings.warn(self._message(low_peak, int(low_steps)), CollapseWarning, stacklevel=3)

    def _message(self, peak: float, low_steps: int) -> str:
        rank = self.status()["effective_rank"]
        return (
            f"the online projections' per-dimension std has stayed at or below {peak:.2g} for the last "
            f"{low_steps} training steps (healthy: about {self.healthy_std:.4f} = 1/sqrt({self.dim}); alarm "
            f"below {self.bound:.2g}), and the last batch spans {rank:.2f} effective dimensions: the "
            "representation is collapsing to one vector, whatever the loss says. Try a lower learning "
            "rate or a warm-up, a higher moving_average_decay or its cosine schedule "
            "(moving_average_total_steps=), another optimiser (LARS/SGD as in the paper), and check "
            "that hidden_layer is the pooled representation. Silence: BYOL(..., collapse_alarm=False)"
        )

    def status(self) -> dict[str, float]:
        """The latest figures, read from the device now (a host sync on accelerators).

        Returns:
            ``std`` (last step), ``healthy_std`` (1/sqrt(D)), ``bound``, ``low_steps`` (in
            a row below the bound), ``steps`` (observed), ``effective_rank`` (of up to 64
            rows of the last batch; 0 before the first step).
        """
        values = self.stats.tolist()
        rows = int(values[_ROWS])
        sample = self.sample[:rows].detach().to("cpu", torch.float64)  # 64 rows; MPS has no float64
        rank = float(effective_rank(sample)) if rows >= 2 else 0.0
        return {
            "std": values[_STD],
            "healthy_std": self.healthy_std,
            "bound": self.bound,
            "low_steps": values[_LOW_STEPS],
            "steps": values[_STEPS],
            "effective_rank": rank,
        }

    def _apply(self, fn: Any, recurse: bool = True) -> CollapseMonitor:
        stats, sample = self.stats.float(), self.sample.float()
        super()._apply(fn, recurse)
        # The figures keep their values and stay float32 whatever the learner is cast to (a bfloat16 step
        # counter stops at 256), and to_empty (a net built on the meta device) does not fill them with garbage.
        self.stats, self.sample = kept_through_apply(stats, self.stats, 0), kept_through_apply(sample, self.sample, 0)
        return self
