"""SNCLR (METHODS.md section 3; Ge et al., ICLR 2023, arXiv 2303.17142).

The key's nearest neighbours in a memory bank of past keys act as extra, soft positives,
weighted by how similar each is to the anchor. ``bank_topk``, ``soft_neighbor_weights``
and ``snclr_loss`` are pure; :class:`SNCLR` is the method that trains with them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from raymix import dist
from raymix.config import Config, ConfigError, SnclrConfig
from raymix.losses import fp32, soft_cross_entropy
from raymix.methods.base import ContrastiveMethod, fifo_write

#: Bank rows compared with the keys at once: bounds the (B, chunk) similarity block.
BANK_CHUNK = 16384


def bank_topk(keys: torch.Tensor, bank: torch.Tensor, k: int, chunk_size: int = BANK_CHUNK) -> torch.Tensor:
    """Indices (B, k) of each key's k most cosine-similar bank rows, most similar first.

    keys: (B, D); bank: (M, D). The bank is scanned ``chunk_size`` rows at a time and the
    running top-k merged with each chunk's, so memory stays O(B * (chunk_size + k)).
    """
    if not 1 <= k <= bank.shape[0]:
        raise ValueError(f"k={k} must be between 1 and the bank size {bank.shape[0]}")
    with fp32(keys):
        return _bank_topk(keys, bank, k, chunk_size)


def _bank_topk(keys: torch.Tensor, bank: torch.Tensor, k: int, chunk_size: int) -> torch.Tensor:
    q = F.normalize(keys.float(), dim=1)
    best_sims = torch.empty(q.shape[0], 0, device=q.device)
    best_index = torch.empty(q.shape[0], 0, dtype=torch.long, device=q.device)
    for start in range(0, bank.shape[0], chunk_size):
        chunk = F.normalize(bank[start : start + chunk_size].float(), dim=1)
        sims = q @ chunk.T  # (B, chunk)
        top = sims.topk(min(k, sims.shape[1]), dim=1)
        best_sims = torch.cat([best_sims, top.values], dim=1)
        best_index = torch.cat([best_index, top.indices + start], dim=1)
        keep = best_sims.topk(min(k, best_sims.shape[1]), dim=1)
        best_sims, best_index = keep.values, best_index.gather(1, keep.indices)
    return best_index


def soft_neighbor_weights(anchor: torch.Tensor, neighbors: torch.Tensor) -> torch.Tensor:
    """w[b, j] = softmax over j of cos(anchor[b], neighbors[b, j]), no temperature.

    anchor: (B, D); neighbors: (B, K, D); returns (B, K), rows summing to one.
    """
    with fp32(anchor):
        a = F.normalize(anchor.float(), dim=-1)
        n = F.normalize(neighbors.float(), dim=-1)
        return torch.softmax(torch.einsum("bd,bkd->bk", a, n), dim=1)


def candidates_of(key: torch.Tensor, neighbors: torch.Tensor) -> torch.Tensor:
    """Rows [key_b, n_b1, ..., n_bK] for every b: (B * (K + 1), D)."""
    return torch.cat([key[:, None, :], neighbors], dim=1).flatten(0, 1)


def snclr_targets(weights: torch.Tensor, offset: int, num_candidates: int) -> torch.Tensor:
    """(B, num_candidates): 1 at row b's own key, weights[b, j] at its own neighbours.

    Sample b's block starts at column ``(offset + b) * (K + 1)``: its key, then its K
    neighbours. ``offset`` is rank * B among gathered candidates.
    """
    batch, k = weights.shape
    block = torch.cat([torch.ones(batch, 1, device=weights.device, dtype=weights.dtype), weights], dim=1)
    targets = torch.zeros(batch, num_candidates, device=weights.device, dtype=weights.dtype)
    columns = (offset + torch.arange(batch, device=weights.device))[:, None] * (k + 1)
    columns = columns + torch.arange(k + 1, device=weights.device)[None, :]
    return targets.scatter(1, columns, block)


def snclr_loss(
    query: torch.Tensor,
    key: torch.Tensor,
    neighbors: torch.Tensor,
    weights: torch.Tensor,
    temperature: float,
    *,
    candidates: torch.Tensor | None = None,
    offset: int = 0,
) -> torch.Tensor:
    """2 tau * mean_b [-log P(k_b) - sum_j w[b, j] log P(n_bj)], P = softmax over the
    candidates of cos(query_b, c) / tau.

    query: (B, D) predictor outputs; key: (B, D); neighbors: (B, K, D); weights: (B, K).
    One process: the candidates are this batch's [key_b, neighbours of b] blocks. Several
    workers: pass the gathered blocks as ``candidates`` (N * (K + 1), D) and this rank's
    ``offset`` = rank * B; ``key`` and ``neighbors`` are then not used.
    """
    if candidates is None:
        candidates = candidates_of(key, neighbors)
    with fp32(query):
        q = F.normalize(query.float(), dim=1)
        c = F.normalize(candidates.float(), dim=1)
        targets = snclr_targets(weights.float(), offset, c.shape[0])
        return 2.0 * temperature * soft_cross_entropy(q @ c.T / temperature, targets)


def weight_entropy(weights: torch.Tensor) -> torch.Tensor:
    """Mean over rows of -sum_j w log w (0 log 0 = 0): log K for uniform weights, 0 for one-hot."""
    return -(weights * weights.clamp_min(1e-12).log()).sum(dim=1).mean()


class SNCLR(ContrastiveMethod):
    """SNCLR on the MoCo v3 base: L = l(1 -> 2) + l(2 -> 1).

    l(v -> v'): queries p_v (predictor), keys k_v' (key branch), the K bank neighbours of
    k_v' weighted from the projector output z_v of the anchor view. Both look-ups use the
    bank as it was before the step; then this worker's raw view-2 keys are enqueued. The
    bank is per worker (never gathered) and travels in the state dict.
    """

    bank: torch.Tensor
    bank_ptr: torch.Tensor

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        method = cfg.method
        assert isinstance(method, SnclrConfig)
        self.num_neighbors = method.num_neighbors
        self.weighting = method.weighting
        self.threshold = method.threshold
        self.detach_weights = method.detach_weights
        self.loss = snclr_loss
        bank = F.normalize(torch.randn(method.bank_size, cfg.head.out_dim), dim=1)
        self.register_buffer("bank", bank)
        self.register_buffer("bank_ptr", torch.zeros((), dtype=torch.long))

    def check_data(self, train_images_per_worker: int, num_classes: int) -> None:
        size = self.bank.shape[0]
        if size > train_images_per_worker:
            raise ConfigError(
                f"method.bank_size={size} is larger than the {train_images_per_worker} training images "
                f"each worker sees per epoch, so it would keep stale keys; allowed: "
                f"{self.num_neighbors}..{train_images_per_worker}"
            )

    # -- bank

    def neighbors(self, keys: torch.Tensor) -> torch.Tensor:
        """The K raw bank rows most similar to each key: (B, K, D), no gradient."""
        index = bank_topk(keys.detach(), self.bank, self.num_neighbors)
        return self.bank[index].detach()

    @torch.no_grad()
    def enqueue_bank(self, keys: torch.Tensor) -> None:
        """FIFO: write this worker's raw keys at the pointer, wrapping around."""
        if self.training:
            fifo_write(self.bank, self.bank_ptr, keys.detach())

    # -- loss

    def weights(self, anchor: torch.Tensor, neighbors: torch.Tensor) -> torch.Tensor:
        """(B, K) soft weights of the neighbours under ``method.weighting`` and ``threshold``."""
        batch, k = neighbors.shape[:2]
        if self.weighting == "uniform":
            return torch.full((batch, k), 1.0 / k, device=neighbors.device)
        weights = soft_neighbor_weights(anchor.detach() if self.detach_weights else anchor, neighbors)
        if self.weighting == "hard":  # all the mass on the neighbour closest to the anchor
            return torch.zeros_like(weights).scatter_(1, weights.argmax(dim=1, keepdim=True), 1.0)
        if self.threshold:
            weights = weights * (weights >= 1.0 / k)
        return weights

    def direction(
        self, z: torch.Tensor, p: torch.Tensor, key: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(l(v -> v'), entropy of the weights) for anchor outputs z, p and the other view's key."""
        neighbors = self.neighbors(key)
        weights = self.weights(z, neighbors)
        candidates = dist.gather_no_grad(candidates_of(key, neighbors))
        offset = self.offset(p.shape[0])
        loss = self.loss(p, key, neighbors, weights, self.temperature, candidates=candidates, offset=offset)
        return loss, weight_entropy(weights.detach())

    def forward(
        self, view1: torch.Tensor, view2: torch.Tensor, labels: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        z1, p1 = self.online(view1)
        z2, p2 = self.online(view2)
        k1, k2 = self.key_from(view1, z1), self.key_from(view2, z2)
        loss_12, entropy_12 = self.direction(z1, p1, k2)
        loss_21, entropy_21 = self.direction(z2, p2, k1)
        self.enqueue_bank(k2)
        logs = {
            "loss/view1_to_view2": loss_12.detach(),
            "loss/view2_to_view1": loss_21.detach(),
            "snclr/weight_entropy": (entropy_12 + entropy_21) / 2,
        }
        return loss_12 + loss_21, logs
