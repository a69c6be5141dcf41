"""Relevance scores of candidate teachers for a target task, from their features on its labelled data.

DistillNearest / DistillWeighted (Borup, Phoo and Hariharan, "Distilling from Similar Tasks for Transfer Learning on
a Budget", ICCV 2023) pick the most relevant source model, or weight all of them, by a task-similarity score of each
source's features on the few labelled target examples. The paper's exact metric and normaliser are not restated
here (we could not verify them); kd_plugins offers three scores, all higher-is-better:

* ``"knn"``: leave-one-out k-nearest-neighbour accuracy (cosine similarity of L2-normalised features, majority vote
  of the ``k`` nearest other examples, ties to the nearer neighbours);
* ``"linear_probe"``: cross-validated accuracy of a closed-form ridge-regression probe on standardised features to
  one-hot labels, ``W = (X^T X + lambda n I)^{-1} X^T Y`` (the dual form when features outnumber examples);
* ``"logme"``: LogME (You, Liu, Wang and Long, "LogME: Practical Assessment of Pre-trained Models for Transfer
  Learning", ICML 2021), the log marginal evidence per example of a Bayesian linear model from features to each
  one-hot label column, averaged over classes. With ``F`` the ``n x D`` features, ``sigma_i`` the eigenvalues of
  ``F^T F`` and a label column ``y``, the evidence maximisation alternates (fixed point, from alpha = beta = 1)
  ``gamma = sum_i beta sigma_i / (alpha + beta sigma_i)``, ``m = beta (alpha I + beta F^T F)^{-1} F^T y``,
  ``alpha = gamma / m^T m``, ``beta = (n - gamma) / ||F m - y||^2``, and the score is
  ``(n/2 log beta + D/2 log alpha - n/2 log 2 pi - beta/2 ||F m - y||^2 - alpha/2 m^T m
  - 1/2 sum_i log(alpha + beta sigma_i)) / n``.

These score a teacher's *representation* (how well its features separate the target classes), which is what
matters for teachers trained on other tasks (the paper's setting). A teacher trained on the target's own label space
is better judged by its predictions:

* ``"accuracy"``: the teacher's own top-1 accuracy on the labelled data (its logits' argmax against the labels;
  ``features`` then returns logits, default: the model's ``logits`` output). On BBC News (benchmarks/multi_teacher)
  the kNN score of each teacher's input representation ranked a TF-IDF classifier trained on 762 labels (test
  accuracy 0.975) below a MiniLM head trained on 20 (0.865), because 25 labelled articles make TF-IDF neighbours
  weak; the teachers' own accuracy on the same 25 articles ranks them correctly.

Default: ``knn``, the cheapest score with no hyper-parameter to fit and a fixed range [0, 1]. The weights of
DistillWeighted are ``softmax(score / tau)`` (:meth:`kd_plugins.distill.teacher_set.TeacherSet.weighted`); accuracy
scores lie in [0, 1], so ``tau`` around 0.05-0.1 separates teachers a few points apart.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._utils import model_device

__all__ = [
    "score_teachers",
    "score_teachers_per_class",
    "score_features",
    "score_features_per_class",
    "knn_accuracy",
    "linear_probe_accuracy",
    "logme_score",
    "prediction_accuracy",
    "SCORES",
]

SCORES = ("knn", "linear_probe", "logme", "accuracy")


def knn_accuracy(features: torch.Tensor, labels: torch.Tensor, k: int = 5) -> float:
    """Leave-one-out k-NN accuracy of ``features`` ``[n, D]`` for integer ``labels`` ``[n]`` (cosine similarity)."""
    return float(knn_correct(features, labels, k).double().mean())


def knn_correct(features: torch.Tensor, labels: torch.Tensor, k: int = 5) -> torch.Tensor:
    """``[n]`` bool: whether each example's leave-one-out k-NN vote (cosine similarity) gives its label."""
    x, y = _checked(features, labels)
    n = x.shape[0]
    k = max(1, min(k, n - 1))
    x = F.normalize(x, dim=-1)
    sim = x @ x.T
    sim.fill_diagonal_(float("-inf"))  # leave one out
    near = sim.topk(k, dim=-1).indices
    classes = int(y.max()) + 1
    votes = F.one_hot(y[near], classes).to(x.dtype)
    # ties go to the nearer neighbours: a vote is 1 plus a small share of its (rank-ordered) similarity
    rank_bonus = 1e-3 * torch.linspace(1.0, 0.5, k, dtype=x.dtype).unsqueeze(-1)
    return (votes * (1 + rank_bonus)).sum(1).argmax(-1) == y


def prediction_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy of ``logits`` ``[n, C]`` (a teacher's predictions over the target classes) for ``labels``."""
    return float(prediction_correct(logits, labels).double().mean())


def prediction_correct(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``[n]`` bool: whether each row's argmax of ``logits`` ``[n, C]`` is its label."""
    x, y = _checked(logits, labels)
    if x.shape[-1] <= int(y.max()):
        raise ValueError(
            f"score 'accuracy' needs logits over the target classes: got {x.shape[-1]} columns for labels up to "
            f"{int(y.max())}. Use a feature score (knn, linear_probe, logme) for teachers of another label space."
        )
    return x.argmax(-1) == y


def linear_probe_accuracy(
    features: torch.Tensor, labels: torch.Tensor, *, folds: int = 5, ridge: float = 1e-2, seed: int = 0
) -> float:
    """Cross-validated accuracy of a closed-form ridge probe (standardised features -> one-hot labels)."""
    return float(linear_probe_correct(features, labels, folds=folds, ridge=ridge, seed=seed).double().mean())


def linear_probe_correct(
    features: torch.Tensor, labels: torch.Tensor, *, folds: int = 5, ridge: float = 1e-2, seed: int = 0
) -> torch.Tensor:
    """``[n]`` bool: whether the ridge probe fitted on the other folds predicts each example's label."""
    x, y = _checked(features, labels)
    n, classes = x.shape[0], int(y.max()) + 1
    folds = max(2, min(folds, n))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    correct = torch.zeros(n, dtype=torch.bool)
    for part in order.chunk(folds):
        train = torch.ones(n, dtype=torch.bool)
        train[part] = False
        mean, std = x[train].mean(0), x[train].std(0).clamp_min(1e-6)
        xt, xv = _with_bias((x[train] - mean) / std), _with_bias((x[part] - mean) / std)
        w = _ridge(xt, F.one_hot(y[train], classes).to(x.dtype), ridge)
        correct[part] = (xv @ w).argmax(-1) == y[part]
    return correct


def _with_bias(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], 1)


def _ridge(x: torch.Tensor, targets: torch.Tensor, ridge: float) -> torch.Tensor:
    """``argmin_W ||X W - T||^2 + ridge n ||W||^2`` (primal or dual form, whichever system is smaller)."""
    n, d = x.shape
    lam = ridge * n
    if d <= n:
        return torch.linalg.solve(x.T @ x + lam * torch.eye(d, dtype=x.dtype), x.T @ targets)
    return x.T @ torch.linalg.solve(x @ x.T + lam * torch.eye(n, dtype=x.dtype), targets)


def logme_score(features: torch.Tensor, labels: torch.Tensor, *, max_iter: int = 100, tol: float = 1e-3) -> float:
    """LogME evidence per example (You et al. 2021), averaged over the one-hot label columns (float64)."""
    return float(logme_class_evidence(features, labels, max_iter=max_iter, tol=tol).mean())


def logme_class_evidence(
    features: torch.Tensor, labels: torch.Tensor, *, max_iter: int = 100, tol: float = 1e-3
) -> torch.Tensor:
    """``[C]`` LogME evidence per example of each one-hot label column (float64)."""
    f, y = _checked(features, labels)
    n, d = f.shape
    sigma, v = torch.linalg.eigh(f.T @ f)
    sigma = sigma.clamp_min(0.0)
    evidences = []
    for c in range(int(y.max()) + 1):
        target = (y == c).to(f.dtype)
        proj = v.T @ (f.T @ target)  # F^T y in the eigenbasis
        alpha, beta = 1.0, 1.0
        for _ in range(max_iter):
            gamma = float((beta * sigma / (alpha + beta * sigma)).sum())
            m = v @ (beta * proj / (alpha + beta * sigma))
            m2 = float(m @ m)
            res2 = float(((f @ m - target) ** 2).sum())
            new_alpha, new_beta = gamma / max(m2, 1e-12), (n - gamma) / max(res2, 1e-12)
            done = abs(new_alpha / new_beta - alpha / beta) <= tol * (alpha / beta)
            alpha, beta = new_alpha, new_beta
            if done:
                break
        m = v @ (beta * proj / (alpha + beta * sigma))
        m2, res2 = float(m @ m), float(((f @ m - target) ** 2).sum())
        evidence = (
            n / 2 * math.log(beta)
            + d / 2 * math.log(alpha)
            - n / 2 * math.log(2 * math.pi)
            - beta / 2 * res2
            - alpha / 2 * m2
            - 0.5 * float(torch.log(alpha + beta * sigma).sum())
        )
        evidences.append(evidence / n)
    return torch.tensor(evidences, dtype=torch.float64)


def score_features(features: torch.Tensor, labels: torch.Tensor, score: str = "knn", **kwargs: Any) -> float:
    """One relevance score (higher is better) of ``features`` ``[n, D]`` for ``labels`` ``[n]``."""
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    fn = {
        "knn": knn_accuracy,
        "linear_probe": linear_probe_accuracy,
        "logme": logme_score,
        "accuracy": prediction_accuracy,
    }[score]
    return fn(features, labels, **kwargs)


def score_features_per_class(
    features: torch.Tensor, labels: torch.Tensor, score: str = "accuracy", num_classes: int | None = None, **kwargs: Any
) -> torch.Tensor:
    """``[C]`` relevance scores of ``features`` for each class: the score's per-example correctness averaged over the
    examples of that class (``knn``, ``linear_probe``, ``accuracy``), or LogME's evidence of that class's one-hot
    column (``logme``). Every class of ``range(num_classes)`` needs a labelled example."""
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    y = torch.as_tensor(labels).detach().long().cpu().flatten()
    classes = num_classes if num_classes is not None else int(y.max()) + 1
    counts = torch.bincount(y.clamp_min(0), minlength=classes)
    if counts.numel() > classes:
        raise ValueError(f"labels go up to {int(y.max())}, outside num_classes={classes}.")
    missing = (counts == 0).nonzero().flatten().tolist()
    if missing:
        raise ValueError(
            f"Per-class scores need labelled examples of every class; classes {missing} have none. Add examples of "
            "them, or use the global score (score_teachers / TeacherSet.weighted)."
        )
    if score == "logme":
        return logme_class_evidence(features, y, **kwargs)  # every class is present: one column each
    correct = {"knn": knn_correct, "linear_probe": linear_probe_correct, "accuracy": prediction_correct}[score](
        features, y, **kwargs
    )
    return torch.zeros(classes, dtype=torch.float64).index_add_(0, y, correct.double()) / counts.double()


def score_teachers(
    teachers: Sequence[nn.Module] | Mapping[str, nn.Module],
    labelled_data: Iterable[Any],
    score: str = "knn",
    *,
    features: Callable[[nn.Module, Any], torch.Tensor] | None = None,
    **kwargs: Any,
) -> list[float]:
    """Score every teacher's relevance on ``labelled_data`` (one score per teacher, in order; higher is better).

    Args:
        teachers: teacher modules (a list or a dict, as :class:`~kd_plugins.distill.teacher_set.TeacherSet` takes).
        labelled_data: batches ``(inputs, labels)`` or dicts with ``labels`` (the other keys are the model inputs).
        score: ``"knn"``, ``"linear_probe"``, ``"logme"`` or ``"accuracy"`` (see the module docstring).
        features: ``features(teacher, inputs) -> [B, D]``; default: timm models' pre-logits features
            (``forward_head(forward_features(x), pre_logits=True)``), HF models' mean-pooled last hidden state,
            other modules' flattened outputs. With ``score="accuracy"`` it returns logits (default: the model's
            ``logits``).
        **kwargs: options of the score (``k``; ``folds``, ``ridge``; ``max_iter``, ``tol``).
    """
    return [
        score_features(f, y, score, **kwargs) for f, y in _teacher_features(teachers, labelled_data, score, features)
    ]


def score_teachers_per_class(
    teachers: Sequence[nn.Module] | Mapping[str, nn.Module],
    labelled_data: Iterable[Any],
    score: str = "accuracy",
    *,
    num_classes: int | None = None,
    features: Callable[[nn.Module, Any], torch.Tensor] | None = None,
    **kwargs: Any,
) -> torch.Tensor:
    """``[K, C]`` relevance of every teacher for every class of the target task (higher is better), for
    :meth:`~kd_plugins.distill.teacher_set.TeacherSet.class_weighted`.

    Each row is :func:`score_features_per_class` of one teacher: with the default ``"accuracy"``, the teacher's
    top-1 accuracy on the labelled examples of each class (its recall of that class). Arguments as
    :func:`score_teachers`; ``num_classes`` defaults to the largest label + 1, and every class needs an example.
    """
    rows = [
        score_features_per_class(f, y, score, num_classes, **kwargs)
        for f, y in _teacher_features(teachers, labelled_data, score, features)
    ]
    return torch.stack(rows)


def _teacher_features(
    teachers: Sequence[nn.Module] | Mapping[str, nn.Module],
    labelled_data: Iterable[Any],
    score: str,
    features: Callable[[nn.Module, Any], torch.Tensor] | None,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``[(features [n, D], labels [n])]`` of each teacher on the labelled batches (eval mode, no grad)."""
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    modules = list(teachers.values()) if isinstance(teachers, Mapping) else list(teachers)
    batches = list(labelled_data)
    extract = features or (default_logits if score == "accuracy" else default_features)
    out = []
    for teacher in modules:
        was_training = teacher.training
        teacher.eval()
        feats, labels = [], []
        with torch.no_grad():
            for batch in batches:
                inputs, y = _split_batch(batch)
                feats.append(extract(teacher, inputs).flatten(1).detach().cpu())
                labels.append(torch.as_tensor(y).flatten().cpu())
        teacher.train(was_training)
        out.append((torch.cat(feats), torch.cat(labels)))
    return out


def default_features(teacher: nn.Module, inputs: Any) -> torch.Tensor:
    """Pre-logits features (timm), mean-pooled last hidden state (HF), or the flattened output."""
    device = model_device(teacher)
    if isinstance(inputs, dict):
        inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in inputs.items()}
        out = teacher(**inputs, output_hidden_states=True)
        hidden = out["hidden_states"][-1]
        mask = inputs.get("attention_mask")
        if mask is None:
            return hidden.mean(1)
        m = mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * m).sum(1) / m.sum(1).clamp_min(1)
    x = inputs.to(device)
    if hasattr(teacher, "forward_features") and hasattr(teacher, "forward_head"):
        return teacher.forward_head(teacher.forward_features(x), pre_logits=True)
    out = teacher(x)
    return (out["logits"] if isinstance(out, dict) else out).flatten(1)


def default_logits(teacher: nn.Module, inputs: Any) -> torch.Tensor:
    """The teacher's ``[B, C]`` logits (``teacher(**inputs)`` for a dict, ``teacher(inputs)`` otherwise)."""
    device = model_device(teacher)
    if isinstance(inputs, dict):
        out = teacher(**{k: v.to(device) if torch.is_tensor(v) else v for k, v in inputs.items()})
    else:
        out = teacher(inputs.to(device))
    logits = out["logits"] if isinstance(out, Mapping) else getattr(out, "logits", out)
    if logits.dim() != 2:
        raise ValueError(
            f"score 'accuracy' takes one prediction per example ([B, C] logits), got {tuple(logits.shape)}; "
            "pass features=lambda teacher, inputs: <[B, C] logits> or use a feature score (knn, linear_probe, logme)."
        )
    return logits


def _split_batch(batch: Any) -> tuple[Any, Any]:
    if isinstance(batch, Mapping):
        if "labels" not in batch:
            raise ValueError(f"A labelled batch needs a 'labels' entry; got the keys {sorted(batch)}.")
        return {k: v for k, v in batch.items() if k != "labels"}, batch["labels"]
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    raise ValueError("labelled_data must yield (inputs, labels) pairs or dicts with 'labels'.")


def _checked(features: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.as_tensor(features).detach().double().cpu().flatten(1)
    y = torch.as_tensor(labels).detach().long().cpu().flatten()
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"{x.shape[0]} feature rows but {y.shape[0]} labels; give one label per example.")
    if x.shape[0] < 2:
        raise ValueError(f"Scoring needs at least 2 labelled examples, got {x.shape[0]}.")
    if (y < 0).any():
        raise ValueError("labels must be class indices >= 0 (drop unlabelled rows, e.g. -100, before scoring).")
    if not torch.isfinite(x).all():
        raise ValueError("features contain NaN or inf; check the teacher's outputs.")
    return x, y
