"""Visual words (docs/method.md): soft assignment of features to a codebook, word histogram, word labels;
the learned codebook (VWE / VWL-L) and the memory-bank codebook (VWL-M)."""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def encode_words(features: torch.Tensor, codebook: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Encode (B, D, h, w) features against a (K, D) codebook.

    Returns the soft assignment A (B, K, h, w) = softmax over words of the cosine scores between the
    detached, L2-normalised features and the L2-normalised words; the histogram H (B, K, 1, 1) = sum
    of A over positions; the word labels (B, K) float, 1 where some pixel's argmax word is k (detached).
    Computed in at least float32 whatever the autocast state: a low-precision softmax over K words summed over
    hundreds of positions loses the histogram's resolution.
    """
    if features.dim() != 4 or codebook.dim() != 2 or features.shape[1] != codebook.shape[1]:
        raise ValueError(f"encode_words expects features (B, D, h, w) and codebook (K, D); got "
                         f"{tuple(features.shape)} and {tuple(codebook.shape)}")
    with torch.autocast(features.device.type, enabled=False):
        dt = torch.promote_types(torch.promote_types(features.dtype, codebook.dtype), torch.float32)
        f_hat = F.normalize(features.detach().to(dt), dim=1)
        v_hat = F.normalize(codebook.to(dt), dim=1)
        scores = torch.einsum("bdhw,kd->bkhw", f_hat, v_hat)
        assignment = scores.softmax(dim=1)
        histogram = assignment.sum(dim=(2, 3), keepdim=True)
        word_labels = word_presence(assignment.detach())
    return assignment, histogram, word_labels


def word_presence(assignment: torch.Tensor) -> torch.Tensor:
    """(B, K, h, w) assignment -> (B, K) float: 1 where k is the argmax word of at least one pixel."""
    b, k = assignment.shape[:2]
    winners = assignment.argmax(dim=1).reshape(b, -1)
    labels = torch.zeros(b, k, device=assignment.device, dtype=torch.float32)
    return labels.scatter_(1, winners, 1.0)


def decorrelation_loss(codebook: torch.Tensor) -> torch.Tensor:
    """VWL-L: centre each word over its D entries, G = V V^T, 0.5 * (||G||_F - ||diag(G)||_2)."""
    v = codebook.float()
    v = v - v.mean(dim=1, keepdim=True)
    gram = v @ v.t()
    return 0.5 * (torch.linalg.norm(gram) - torch.linalg.norm(torch.diagonal(gram)))


class LearnedCodebook(nn.Module):
    """V as a trainable (K, D) parameter, Kaiming-normal (a = sqrt(5)) initialised."""

    kind = "learned"

    def __init__(self, num_words: int, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_words, dim))
        nn.init.kaiming_normal_(self.weight, a=math.sqrt(5))

    def decorrelation_loss(self) -> torch.Tensor:
        return decorrelation_loss(self.weight)

    def extra_repr(self) -> str:
        return f"num_words={self.weight.shape[0]}, dim={self.weight.shape[1]}"


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def assigned_means(features: torch.Tensor, winners: torch.Tensor, num_words: int, reduce: bool = True
                   ) -> torch.Tensor:
    """M (K, D): mean of the (B, D, h, w) feature vectors whose argmax word (B, h, w) is k; 0 where none.

    With `reduce` and torch.distributed initialised, per-word sums and counts are summed over all
    processes first, so every replica gets the same M.
    """
    d = features.shape[1]
    vectors = features.detach().float().permute(0, 2, 3, 1).reshape(-1, d)
    idx = winners.reshape(-1)
    sums = torch.zeros(num_words, d, device=vectors.device, dtype=torch.float32).index_add_(0, idx, vectors)
    counts = torch.bincount(idx, minlength=num_words).to(torch.float32)
    if reduce and _world() > 1:
        packed = torch.cat([sums, counts[:, None]], dim=1)  # one collective instead of two
        dist.all_reduce(packed)
        sums, counts = packed[:, :d], packed[:, d]
    return torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], torch.zeros_like(sums))


class MemoryBankCodebook(nn.Module):
    """VWL-M: V is a buffer, Kaiming-normal (a = sqrt(5)) random at first, as the published code. The
    first training step labels words against that random V (the same on every rank: rank 0's, sent by
    `sync_initial`); after that step V is replaced by K feature vectors of the step's global batch drawn
    at random with replacement (`initialise_from`; no EMA at step 1). From step 2 on, after every training
    forward V moves toward the mean of the features assigned to each word: V <- rho * M + (1 - rho) * V.
    Saved in the state dict with its `initialised` flag, so a resumed run continues with the same V."""

    kind = "memory"

    def __init__(self, num_words: int, dim: int, rho: float = 1e-3) -> None:
        super().__init__()
        self.rho = float(rho)
        weight = torch.empty(num_words, dim)
        nn.init.kaiming_normal_(weight, a=math.sqrt(5))
        self.register_buffer("weight", weight)
        self.register_buffer("initialised", torch.zeros((), dtype=torch.bool))
        self._synced = False  # the random V has been made equal on all ranks (not state: per process)

    @torch.no_grad()
    def sync_initial(self) -> None:
        """Before the first training step: every rank takes rank 0's random codebook (once)."""
        if self._synced or bool(self.initialised):
            return
        if _world() > 1:
            dist.broadcast(self.weight, src=0)
        self._synced = True

    @torch.no_grad()
    def initialise_from(self, features: torch.Tensor) -> None:
        """V <- K feature vectors drawn uniformly with replacement from this step's (B, D, h, w) batch
        over all ranks: rank 0 draws the indices (torch's default CPU generator, as the published code)
        and broadcasts them; each rank fills in the vectors it holds, and a sum over ranks assembles V."""
        k, d = self.weight.shape
        vectors = features.detach().float().permute(0, 2, 3, 1).reshape(-1, d)
        n = vectors.shape[0]
        world = _world()
        if world == 1:
            picked = vectors[torch.randint(n, (k,)).to(vectors.device)]
        else:
            sizes = [torch.zeros((), dtype=torch.long, device=vectors.device) for _ in range(world)]
            dist.all_gather(sizes, torch.tensor(n, dtype=torch.long, device=vectors.device))
            sizes_list = [int(s) for s in sizes]
            rank = dist.get_rank()
            idx = torch.randint(sum(sizes_list), (k,)).to(vectors.device)
            dist.broadcast(idx, src=0)
            local = idx - sum(sizes_list[:rank])
            mine = (local >= 0) & (local < n)
            picked = torch.zeros(k, d, device=vectors.device, dtype=torch.float32)
            picked[mine] = vectors[local[mine]]
            dist.all_reduce(picked)  # every index is held by exactly one rank: an exact sum
        self.weight.copy_(picked.to(self.weight.dtype))
        self.initialised.fill_(True)

    @torch.no_grad()
    def update(self, features: torch.Tensor, winners: torch.Tensor) -> None:
        """EMA step toward the per-word means of the un-normalised features (reduced over processes)."""
        means = assigned_means(features, winners, self.weight.shape[0])
        self.weight.mul_(1.0 - self.rho).add_(means.to(self.weight.dtype), alpha=self.rho)

    def extra_repr(self) -> str:
        return f"num_words={self.weight.shape[0]}, dim={self.weight.shape[1]}, rho={self.rho}"
