"""Topic-aware batches: in-batch negatives that are the teacher's topical neighbours, not random examples.

A contrastive pair term (``infonce``) learns only from the negatives a batch happens to hold; with 8 random news
articles most of them are about other topics and trivially told apart. Topic-aware sampling (TAS, Hofstätter et
al. 2021, "Efficiently Teaching an Effective Dense Retriever with Balanced Topic Aware Sampling") clusters the
training queries once by the teacher's embeddings and draws each batch from one cluster, so the negatives are
hard at no extra compute. Here the teacher's embeddings come from the :class:`~kd_plugins.TeacherCache` the
distillation already built, so the clustering costs one k-means on ``[N, D]`` vectors.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from .cache import TeacherCache
from .pairs import split_pairs

SIDES = ("anchor", "positive", "both")


def spherical_kmeans(x: torch.Tensor, n_clusters: int, *, iters: int = 25, seed: int = 0) -> torch.Tensor:
    """Cluster the rows of ``x`` ``[N, D]`` by cosine similarity (k-means++ seeding); returns labels ``[N]``.

    Deterministic for a given ``seed``. Empty clusters are re-seeded with the row farthest from its centroid."""
    if x.dim() != 2 or len(x) == 0:
        raise ValueError(f"spherical_kmeans needs a non-empty [N, D] tensor, got shape {tuple(x.shape)}")
    if not 1 <= n_clusters <= len(x):
        raise ValueError(f"n_clusters must be in [1, {len(x)}] (one per row at most), got {n_clusters}")
    x = torch.nn.functional.normalize(x.float(), dim=1)
    gen = torch.Generator().manual_seed(seed)
    centers = x[torch.randint(len(x), (1,), generator=gen)]
    for _ in range(1, n_clusters):  # k-means++: next center drawn in proportion to its squared distance
        dist = (1.0 - (x @ centers.T).max(1).values).clamp_min(0) ** 2
        weights = dist if dist.sum() > 0 else torch.ones_like(dist)  # all rows on a center: any row, still seeded
        pick = torch.multinomial(weights, 1, generator=gen)
        centers = torch.cat([centers, x[pick]])
    labels = torch.zeros(len(x), dtype=torch.long)
    for _ in range(iters):
        sim = x @ centers.T
        new = sim.argmax(1)
        for c in range(n_clusters):
            members = new == c
            if members.any():
                centers[c] = torch.nn.functional.normalize(x[members].sum(0), dim=0)
            else:  # re-seed with the worst-fitting row not used by an earlier re-seed
                fit = sim.gather(1, new[:, None]).squeeze(1)
                worst = fit.argmin()
                centers[c], new[worst] = x[worst], c
                sim[worst] = float("inf")
        if torch.equal(new, labels):
            break
        labels = new
    return labels


class TopicAwareBatches(torch.utils.data.IterableDataset):
    """Yields the examples of ``dataset`` so that every ``batch_size`` consecutive ones come from one topic cluster.

    Give it to a ``transformers.Trainer`` as ``train_dataset`` (with ``per_device_train_batch_size=batch_size``
    and ``max_steps``): the Trainer batches an iterable dataset in the order it yields. Each pass (epoch) draws a new
    order: every cluster's members are shuffled and cut into batches, the batches of all clusters shuffled together;
    a cluster's remainder (fewer than ``batch_size``) is pooled with the other remainders, so every example appears
    once per pass.

    Args:
        dataset: a map-style dataset of tokenized examples (pair examples as :class:`~kd_plugins.PairCollator`
            takes, or plain ones), the one ``cache`` was built over.
        cache: an ``embedding`` :class:`~kd_plugins.TeacherCache` holding every example's teacher embedding.
        batch_size: examples per batch (the Trainer's per-device batch size).
        n_clusters: topic clusters; default ``N // (4 * batch_size)`` (about four batches per cluster and pass),
            at least 1. More clusters: harder negatives and more false negatives (near-duplicates in one batch).
        side: which embedding of a pair example clusters it: the ``"anchor"`` (the query, as TAS does), the
            ``"positive"`` or ``"both"`` (their normalised mean). Plain examples always use their own.
        seed: seeds the clustering and every pass's order (pass ``e`` uses ``seed + e``).
    """

    def __init__(
        self,
        dataset: Sequence[Mapping[str, Any]],
        cache: TeacherCache,
        batch_size: int,
        *,
        n_clusters: int | None = None,
        side: str = "anchor",
        seed: int = 0,
    ):
        if cache.kind != "embedding":
            raise ValueError(
                f"TopicAwareBatches needs an 'embedding' TeacherCache (teacher sentence embeddings); got a "
                f"{cache.kind!r} cache. Build one with build_teacher_cache(teacher, dataset, kind='embedding')."
            )
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if side not in SIDES:
            raise ValueError(f"side must be one of {SIDES}, got {side!r}")
        n = len(dataset)
        if n == 0:
            raise ValueError("TopicAwareBatches got an empty dataset")
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.n_clusters = n_clusters if n_clusters is not None else max(1, n // (4 * batch_size))
        if not 1 <= self.n_clusters <= n:
            raise ValueError(f"n_clusters must be in [1, {n}] for {n} examples, got {self.n_clusters}")
        emb = torch.stack([_embedding(cache, dataset[i], side) for i in range(n)])
        self.labels = spherical_kmeans(emb, self.n_clusters, seed=seed)
        self._epoch = 0

    def __len__(self) -> int:
        return len(self.dataset)

    def set_epoch(self, epoch: int) -> None:
        """Pick the pass whose order the next iteration yields (the Trainer calls it each epoch)."""
        self._epoch = epoch

    def batches(self, epoch: int) -> list[list[int]]:
        """The batches (lists of dataset indices) of pass ``epoch``."""
        rng = random.Random(self.seed + epoch)
        batches, leftovers = [], []
        for c in range(self.n_clusters):
            members = (self.labels == c).nonzero().flatten().tolist()
            rng.shuffle(members)
            full = len(members) - len(members) % self.batch_size
            batches += [members[i : i + self.batch_size] for i in range(0, full, self.batch_size)]
            leftovers += members[full:]
        rng.shuffle(leftovers)
        batches += [leftovers[i : i + self.batch_size] for i in range(0, len(leftovers), self.batch_size)]
        rng.shuffle(batches)
        return batches

    def __iter__(self) -> Iterator[Mapping[str, Any]]:
        epoch, self._epoch = self._epoch, self._epoch + 1
        for batch in self.batches(epoch):
            for i in batch:
                yield self.dataset[i]

    @property
    def cluster_sizes(self) -> list[int]:
        return torch.bincount(self.labels, minlength=self.n_clusters).tolist()


def _embedding(cache: TeacherCache, example: Mapping[str, Any], side: str) -> torch.Tensor:
    anchor, positive = split_pairs(example)
    groups = (
        [anchor] if positive is None else {"anchor": [anchor], "positive": [positive]}.get(side, [anchor, positive])
    )
    vecs = []
    for g in groups:
        ids = torch.as_tensor(g["input_ids"]).reshape(1, -1)
        mask = g.get("attention_mask")
        mask = None if mask is None else torch.as_tensor(mask).reshape(1, -1)
        vecs.append(
            torch.nn.functional.normalize(cache.tensors["embeddings"][cache.rows_of(ids, mask)[0]].float(), dim=0)
        )
    return torch.stack(vecs).mean(0)


__all__ = ["TopicAwareBatches", "spherical_kmeans"]
