"""Heavy ranker: a calibrated multi-gate mixture-of-experts (MMoE) network with one head per
engagement (``schema.HEADS``), each head starting from the post's popularity prior.

Architecture (:class:`HeavyRankerNet`, one self-contained ``nn.Module``)::

    x [N, F] float32, NaN allowed
      -> input normalisation (buffers: training medians for NaN, log1p on heavy-tailed counts,
         standardisation, clip to +-10; see models.features.InputNormalisation) -> u [N, F]
         (id bucket columns are zeroed in u: a hash is not a magnitude)
      -> hashed id embeddings (user, post, author; core.id_features): bucket b -> E_k[b] [8],
         buckets seen < id_min_count times in training -> the out-of-vocabulary row E_k[0]
      -> target attention over the user action sequence (DIN; only with the sequence columns
         ``core.schema.SEQUENCE_ID_FEATURES`` among the inputs): each of the L sequence posts is
         embedded with the candidates' post and author tables, k_i = [E_post, E_author] [16]; the
         candidate q = [E_post, E_author] [16]; weight a_i = MLP([q, k_i, q - k_i, q * k_i])
         (64 -> 32 -> PReLU -> 1, no softmax, padding masked); pooled s = sum_i a_i k_i [16]
      -> v = [u, E_user, E_post, E_author, s]  [F + 24 (+ 16)]
      -> E experts, each a small MLP on v (default 4 experts of one 64-unit ReLU layer) -> e_k
      -> one softmax gate per head over the experts: g_h = softmax(W_h v + c_h)  [E]
      -> mixture per head m_h = sum_k g_h[k] e_k
      -> one tower per head (Linear D->32, ReLU, Linear 32->1) -> r_h
      -> logit z_h = r_h + logit(clip(post_{h}_rate_total, eps, 1 - eps))   (the prior offset)
      -> Platt scaling per head (buffers a_h, b_h): p_h = sigmoid(a_h z_h + b_h)
    -> calibrated probabilities [N, H] float32

MMoE (Ma et al. 2018, "Modeling Task Relationships in Multi-task Learning with Multi-gate
Mixture-of-Experts", KDD) replaces the shared bottom: every head mixes the same experts with its
own gate, so heads that help each other can share experts while conflicting ones (e.g. ``hate``
against the positive engagements) can lean on different experts instead of fighting over one
shared representation.

Id embeddings. The hashing trick (Weinberger et al. 2009) bounds the tables (2^15 user, 2^14 post
and author buckets + 1); a bucket's embedding is trained only if at least ``id_min_count`` training
rows hashed to it, every other bucket (and a missing id, bucket 0) reads row 0, the out-of-
vocabulary embedding, which is trained on the rare ids: so a new user or post at serving time gets
the embedding of "rarely seen", not an untrained random vector (the OOV bucket of Twitter's and
YouTube's id features; Covington et al. 2016, "Deep Neural Networks for YouTube
Recommendations", sec. 4.1). The embeddings start near zero (std 0.01) and take dropout.

Target attention. A user's interests are many; which of them matters depends on the candidate.
DIN (Zhou et al. 2018, "Deep Interest Network for Click-Through Rate Prediction", KDD, sec. 4.3)
weights each past behaviour by an activation unit on (candidate, behaviour) and sums the weighted
behaviour embeddings, without softmax so the sum keeps the intensity of the matching interest;
the embeddings are shared with the candidate's. The activation is PReLU (DIN's Dice is its
data-adaptive generalisation). The sequence is the user action sequence's newest
``core.history_features.ATTENTION_LENGTH`` posts, hashed like the candidate ids, as frame columns
(0 = padding): the model still takes one ``[N, F]`` matrix, so every serving path is unchanged.

Prior offset. ``post_{h}_rate_total`` is the post's smoothed historical rate of head ``h`` (the
"popularity lookup", which on its own beats the shared-bottom network on the rare heads). Its
log-odds is added to head ``h``'s logit as a fixed *offset*, the offset term of generalized
linear models (McCullagh & Nelder 1989, "Generalized Linear Models", 2nd ed., sec. 6.2.3: a
known covariate entering the linear predictor with coefficient 1), also the "prior / base
score" trick of boosted trees (``base_margin`` in XGBoost). The last layer of each tower starts
at zero, so an untrained network predicts exactly the popularity prior and training learns the
residual. The offset reads the raw feature (NaN -> the training median, clipped to
``[prior_eps, 1 - prior_eps]``, default 1e-4: logits within +-9.2). A head whose prior column is
not among the features gets no offset (older feature lists keep working).

Loss. Per-head binary cross-entropy with ``pos_weight = clip(sqrt(n_neg / n_pos), 1, 50)``,
summed over heads. Rare heads (follow, comment, forward, hate: ~0.1% positives here) give almost
no gradient under plain BCE, so the shared experts ignore them; full inverse-frequency weighting
(~1000x) makes gradients dominated by a few hundred rows and training unstable. The square root
is the usual compromise (smoothed inverse frequency, e.g. Mikolov et al. 2013 subsampling,
Mahajan et al. 2018 "Exploring the Limits of Weakly Supervised Pretraining"). Weighting shifts the
raw probabilities upward; Platt scaling on the held-out calibration day removes that shift.
Focal loss (Lin et al. 2017) was not used: it also distorts probabilities and adds a tuned
exponent, while sqrt weighting + Platt scaling is simpler and keeps BCE's proper-scoring
behaviour after calibration.

Within-context ranking loss (optional, off by default). Serving ranks one user's candidates
against each other, so what separates two users (their base rates) does not matter there, yet
under BCE it dominates the gradient. With ``rank_loss_weight > 0`` each head also gets a listwise
softmax loss inside a context: ``-mean over positives i of log softmax(z)_i`` over the context,
for contexts with both classes, summed with the BCE (the hybrid of Sheng et al. 2023, "Joint
Optimization of Ranking and Calibration with Contextualized Hybrid Model", JRC, KDD), Platt
scaling afterwards as before; mini-batches then hold whole contexts. Measured on KuaiRand's
validation days: with a (user, surface, day) context, user-level GAUC rose from 0.59 to 0.68
(click) and 0.60 to 0.69 (long_view) while request-level GAUC fell (0.569 -> 0.548 click): it
learns which of a user's requests engage, not which candidates; with the request as context
(1.2 impressions per request on average) it changed nothing beyond noise. Hence off.

Training: Adam, mini-batches, early stopping on the calibration day's loss (the last training
day), best weights restored; then Platt scaling fitted on that same day.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
import torch
from torch import nn

from core.id_features import ID_BUCKETS
from core.history_features import SEQUENCE_AUTHOR_FEATURES, SEQUENCE_POST_FEATURES
from core.schema import HEADS, HEAVY_RANKER_FEATURES, SEQUENCE_ID_FEATURES, post_prior_rate
from models.features import InputNormalisation, feature_matrix
from models.split import split_calibration_day


# the popularity-prior feature whose log-odds offsets a head's logit
prior_feature = post_prior_rate


class HeavyRankerNet(nn.Module):
    """Self-contained heavy ranker: ``forward(x: float32 [N, F]) -> float32 [N, H]`` probabilities.

    Everything needed at serving time lives inside the module as parameters or buffers (input
    medians/log1p mask/mean/std, prior-offset column indices and mask, Platt ``a``/``b``), so
    ``torch.export`` / ``torch.onnx.export`` capture the whole transform. ``feature_names`` and
    ``heads`` are plain attributes for the record (the MLflow model metadata carries them for the
    exported form).

    Args:
        norm: fitted input normalisation (defines the feature order).
        heads: output heads.
        hidden: layer widths of each expert MLP (its last width is the expert output size).
        tower: hidden width of each head's tower.
        dropout: dropout after every expert layer (training only).
        n_experts: number of experts shared by all heads' gates.
        prior_offset: add ``logit(post_{h}_rate_total)`` to head ``h``'s logit when that column exists.
        prior_eps: the prior rate is clipped to ``[prior_eps, 1 - prior_eps]`` before the logit.
        id_embedding_dim: width of each id embedding (0 = no id embeddings; the id columns are
            then ignored). Ids are the features of ``core.id_features.ID_BUCKETS`` among the inputs.
        id_vocab: per id feature, a bool array ``[B + 1]``: which buckets have a trained embedding
            (the rest read the out-of-vocabulary row 0); default all but 0 (see ``id_vocabulary``).
        sequence_attention: attend over the sequence columns (``SEQUENCE_ID_FEATURES``) when they,
            the post and author id features and id embeddings are all present. The sequence
            columns never enter the dense input (they are hashes), attention or not.
        attention_hidden: width of the attention unit's hidden layer.
    """

    def __init__(self, norm: InputNormalisation, heads: Sequence[str], hidden: Sequence[int] = (64,),
                 tower: int = 32, dropout: float = 0.1, n_experts: int = 4, prior_offset: bool = True,
                 prior_eps: float = 1e-4, id_embedding_dim: int = 8,
                 id_vocab: dict[str, np.ndarray] | None = None, sequence_attention: bool = False,
                 attention_hidden: int = 32):
        super().__init__()
        if n_experts < 1 or not hidden:
            raise ValueError(f"need n_experts >= 1 and at least one expert layer; got {n_experts}, {hidden}")
        if not 0 < prior_eps < 0.5:
            raise ValueError(f"prior_eps must be in (0, 0.5); got {prior_eps}")
        self.feature_names = tuple(norm.feature_names)
        self.heads = tuple(heads)
        self.n_experts = int(n_experts)
        n_in, n_heads = len(self.feature_names), len(self.heads)
        self.register_buffer("in_median", torch.from_numpy(norm.median.astype(np.float32)))
        self.register_buffer("in_log1p", torch.from_numpy(norm.log1p.astype(bool)))
        self.register_buffer("in_mean", torch.from_numpy(norm.mean.astype(np.float32)))
        self.register_buffer("in_std", torch.from_numpy(norm.std.astype(np.float32)))
        self.register_buffer("in_clip", torch.tensor(float(norm.clip)))
        index = {n: i for i, n in enumerate(self.feature_names)}
        self.id_features = tuple(f for f in ID_BUCKETS if f in index) if id_embedding_dim > 0 else ()
        dense = torch.ones(n_in)
        for f in (*ID_BUCKETS, *SEQUENCE_ID_FEATURES):
            if f in index:
                dense[index[f]] = 0.0
        self.register_buffer("dense_mask", dense)
        self.register_buffer("id_index", torch.tensor([index[f] for f in self.id_features], dtype=torch.long))
        self.id_embeddings = nn.ModuleList()
        for j, f in enumerate(self.id_features):
            size = ID_BUCKETS[f][1] + 1
            emb = nn.Embedding(size, id_embedding_dim)
            nn.init.normal_(emb.weight, std=0.01)
            self.id_embeddings.append(emb)
            vocab = np.ones(size, dtype=bool) if id_vocab is None else np.asarray(id_vocab[f], dtype=bool)
            if vocab.shape != (size,):
                raise ValueError(f"id_vocab[{f!r}] must have shape ({size},), got {vocab.shape}")
            vocab = vocab.copy()
            vocab[0] = False
            self.register_buffer(f"id_vocab_{j}", torch.from_numpy(vocab))
        self.id_dropout = nn.Dropout(dropout)
        n_in = n_in + len(self.id_features) * id_embedding_dim
        # DIN target attention: needs the whole sequence and the post and author tables
        self.attends = bool(sequence_attention) and all(f in index for f in SEQUENCE_ID_FEATURES) \
            and "id_post_bucket" in self.id_features and "id_author_bucket" in self.id_features
        self.register_buffer("seq_post_index", torch.tensor(
            [index[f] for f in SEQUENCE_POST_FEATURES] if self.attends else [], dtype=torch.long))
        self.register_buffer("seq_author_index", torch.tensor(
            [index[f] for f in SEQUENCE_AUTHOR_FEATURES] if self.attends else [], dtype=torch.long))
        self._post_j = self.id_features.index("id_post_bucket") if self.attends else -1
        self._author_j = self.id_features.index("id_author_bucket") if self.attends else -1
        if self.attends:
            width = 2 * id_embedding_dim
            self.attention = nn.Sequential(nn.Linear(4 * width, attention_hidden), nn.PReLU(),
                                           nn.Linear(attention_hidden, 1))
            n_in += width

        def expert() -> nn.Sequential:
            layers: list[nn.Module] = []
            width = n_in
            for h in hidden:
                layers += [nn.Linear(width, h), nn.ReLU(), nn.Dropout(dropout)]
                width = h
            return nn.Sequential(*layers)

        self.experts = nn.ModuleList(expert() for _ in range(self.n_experts))
        width = int(hidden[-1])
        self.gates = nn.Linear(n_in, n_heads * self.n_experts)  # all heads' gate logits at once
        self.towers = nn.ModuleList(
            nn.Sequential(nn.Linear(width, tower), nn.ReLU(), nn.Linear(tower, 1)) for _ in self.heads
        )
        for t in self.towers:  # residual starts at 0: the untrained net predicts the prior offset
            nn.init.zeros_(t[-1].weight)
            nn.init.zeros_(t[-1].bias)
        # prior offset: column of post_{h}_rate_total per head (0 + mask 0 when absent)
        cols = [index.get(prior_feature(h), -1) if prior_offset else -1 for h in self.heads]
        self.register_buffer("prior_index", torch.tensor([max(c, 0) for c in cols], dtype=torch.long))
        self.register_buffer("prior_mask", torch.tensor([float(c >= 0) for c in cols]))
        self.register_buffer("prior_eps", torch.tensor(float(prior_eps)))
        # Platt scaling p = sigmoid(a z + b); identity until calibrate() is called.
        self.register_buffer("platt_a", torch.ones(n_heads))
        self.register_buffer("platt_b", torch.zeros(n_heads))

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """Input transform: ``[N, F]`` raw features (NaN allowed) -> standardised ``[N, F]``."""
        x = torch.where(torch.isnan(x), self.in_median, x)
        x = torch.where(self.in_log1p, torch.log1p(torch.clamp(x, min=0.0)), x)
        x = (x - self.in_mean) / self.in_std
        return torch.clamp(x, -self.in_clip, self.in_clip) * self.dense_mask

    def embed_ids(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Id embeddings ``[N, D]`` per id feature: bucket -> its row, or row 0 if out of vocabulary."""
        return [self._lookup(j, torch.index_select(x, 1, self.id_index[j:j + 1]).squeeze(1))
                for j in range(len(self.id_embeddings))]

    def _lookup(self, j: int, raw: torch.Tensor) -> torch.Tensor:
        """Embeddings of id feature ``j`` for raw buckets of any shape (NaN/0 -> row 0; OOV -> row 0)."""
        emb = self.id_embeddings[j]
        bucket = torch.nan_to_num(raw, nan=0.0).clamp(0.0, float(emb.num_embeddings - 1)).to(torch.long)
        vocab = getattr(self, f"id_vocab_{j}")
        bucket = torch.where(vocab[bucket], bucket, torch.zeros_like(bucket))
        return self.id_dropout(emb(bucket))

    def attend(self, x: torch.Tensor, ids: list[torch.Tensor]) -> torch.Tensor:
        """DIN pooling ``[N, 2D]``: the sequence's embeddings weighted by the attention unit on
        (candidate, behaviour); padding (bucket 0 / NaN) weighs nothing; an empty sequence gives 0."""
        seq_posts = torch.index_select(x, 1, self.seq_post_index)  # [N, L]
        seq_authors = torch.index_select(x, 1, self.seq_author_index)
        keys = torch.cat([self._lookup(self._post_j, seq_posts), self._lookup(self._author_j, seq_authors)],
                         dim=2)  # [N, L, 2D]
        query = torch.cat([ids[self._post_j], ids[self._author_j]], dim=1).unsqueeze(1).expand_as(keys)
        weight = self.attention(torch.cat([query, keys, query - keys, query * keys], dim=2))  # [N, L, 1]
        present = (torch.nan_to_num(seq_posts, nan=0.0) > 0).to(keys.dtype).unsqueeze(2)
        return (weight * present * keys).sum(dim=1)

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        """Expert and gate input ``[N, F + ids * D (+ 2D with attention)]``: normalised features,
        id embeddings and the attention-pooled sequence."""
        u = self.normalise(x)
        if not len(self.id_embeddings):
            return u
        ids = self.embed_ids(x)
        return torch.cat([u, *ids, self.attend(x, ids)] if self.attends else [u, *ids], dim=1)

    def gate_weights(self, u: torch.Tensor) -> torch.Tensor:
        """Per-head softmax gates ``[N, H, E]`` for expert inputs ``u`` (see ``inputs``)."""
        return torch.softmax(self.gates(u).reshape(-1, len(self.heads), self.n_experts), dim=-1)

    def prior_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Offset ``[N, H]``: ``logit(clip(post_{h}_rate_total))`` per head, 0 for heads without it."""
        raw = torch.index_select(x, 1, self.prior_index)
        raw = torch.where(torch.isnan(raw), torch.index_select(self.in_median, 0, self.prior_index), raw)
        rate = torch.clamp(raw, min=self.prior_eps, max=1.0 - self.prior_eps)
        return (torch.log(rate) - torch.log1p(-rate)) * self.prior_mask

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Uncalibrated logits ``[N, H]`` (what the loss trains): tower residual + prior offset."""
        u = self.inputs(x)
        experts = torch.stack([e(u) for e in self.experts], dim=1)  # [N, E, D]
        mixed = torch.bmm(self.gate_weights(u), experts)  # [N, H, D]
        residual = torch.cat([t(mixed[:, j]) for j, t in enumerate(self.towers)], dim=1)
        return residual + self.prior_logits(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Calibrated probabilities ``float32 [N, H]`` in the order of ``self.heads``."""
        return torch.sigmoid(self.logits(x) * self.platt_a + self.platt_b)

    def set_calibration(self, a: np.ndarray, b: np.ndarray) -> None:
        """Store Platt parameters (``[H]`` each) in the buffers."""
        self.platt_a.copy_(torch.as_tensor(a, dtype=torch.float32))
        self.platt_b.copy_(torch.as_tensor(b, dtype=torch.float32))


def id_vocabulary(x: np.ndarray, feature_names: Sequence[str], min_count: int) -> dict[str, np.ndarray]:
    """Which id buckets get a trained embedding: those with ``>= min_count`` rows in ``x``.

    Args:
        x: training matrix ``[N, F]`` (float32, id bucket columns hold ints 0..B).
        feature_names: its column names; id features are those of ``core.id_features.ID_BUCKETS``.
        min_count: rows a bucket needs; rarer buckets share the out-of-vocabulary row 0.

    Returns:
        ``{id feature: bool [B + 1]}`` for the id features among ``feature_names``; index 0 is False.
    """
    out: dict[str, np.ndarray] = {}
    for j, name in enumerate(feature_names):
        if name not in ID_BUCKETS:
            continue
        size = ID_BUCKETS[name][1] + 1
        col = np.nan_to_num(x[:, j], nan=0.0).clip(0, size - 1).astype(np.int64)
        vocab = np.bincount(col, minlength=size) >= max(int(min_count), 1)
        vocab[0] = False
        out[name] = vocab
    return out


def fit_platt(z: np.ndarray, y: np.ndarray, max_iter: int = 100) -> tuple[float, float]:
    """Platt scaling: ``(a, b)`` minimising the log loss of ``sigmoid(a z + b)`` against ``y``.

    Uses Platt's smoothed targets ``(N+ + 1) / (N+ + 2)`` for positives and ``1 / (N- + 2)`` for
    negatives (Platt 1999, "Probabilistic outputs for support vector machines"), solved by
    Newton's method with backtracking line search (Lin, Lin & Weng 2007, "A note on Platt's
    probabilistic outputs for support vector machines"). The smoothed targets keep the problem
    well posed even without positives (then ``p`` goes to about ``1 / (N- + 2)``).

    Args:
        z: logits ``[N]``; y: labels ``[N]`` in {0, 1}.

    Returns:
        ``(a, b)`` as floats.

    Raises:
        ValueError: empty input or mismatched lengths.
    """
    z = np.asarray(z, dtype=np.float64).ravel()
    y = np.asarray(y, dtype=np.float64).ravel()
    if len(z) == 0 or len(z) != len(y):
        raise ValueError(f"fit_platt needs equal, non-zero lengths; got {len(z)} logits and {len(y)} labels")
    n_pos = y.sum()
    n_neg = len(y) - n_pos
    t = np.where(y > 0, (n_pos + 1) / (n_pos + 2), 1 / (n_neg + 2))

    def nll(a: float, b: float) -> float:
        f = a * z + b  # -log-likelihood with logits f: log(1 + e^f) - t f, computed stably
        return float(np.sum(np.logaddexp(0.0, f) - t * f))

    # Platt's start: a = 0 and b = the smoothed prior log-odds.
    a, b = 0.0, math.log((n_pos + 1) / (n_neg + 1))
    best = nll(a, b)
    for _ in range(max_iter):
        p = 0.5 * (1.0 + np.tanh(0.5 * (a * z + b)))  # sigmoid without overflow
        g = p - t
        w = p * (1 - p)
        grad = np.array([np.sum(g * z), np.sum(g)])
        if np.max(np.abs(grad)) < 1e-7 * len(z):
            break
        hess = np.array([[np.sum(w * z * z), np.sum(w * z)], [np.sum(w * z), np.sum(w)]]) + 1e-12 * np.eye(2)
        direction = -np.linalg.solve(hess, grad)
        slope = float(grad @ direction)  # < 0 for a descent direction
        lr = 1.0
        while lr >= 1e-10:
            na, nb = a + lr * direction[0], b + lr * direction[1]
            val = nll(na, nb)
            if val <= best + 1e-4 * lr * slope:  # Armijo condition
                break
            lr /= 2
        else:
            break  # no decrease possible: at the optimum up to rounding
        a, b, best = na, nb, val
    return float(a), float(b)


@dataclass(frozen=True)
class HeavyRankerParams:
    """Training settings of the heavy ranker.

    Architecture (see :class:`HeavyRankerNet`): ``n_experts`` experts, each an MLP with layer
    widths ``hidden``; one softmax gate and one tower (hidden width ``tower``) per head;
    ``prior_offset`` adds ``logit(clip(post_{h}_rate_total, prior_eps, 1 - prior_eps))`` to head
    ``h``'s logit when that feature is an input; ``id_embedding_dim`` is the width of each hashed
    id embedding (0: none) and ``id_min_count`` the training rows a bucket needs to get its own
    embedding instead of the out-of-vocabulary one; ``sequence_attention`` turns on DIN target
    attention over the sequence columns (with ``attention_hidden`` units) when they are inputs;
    ``rank_loss_weight`` weights the within-context
    softmax loss (0: BCE only) and ``rank_context`` names the columns that form a context (those
    absent from the frame are skipped). The small defaults (4 experts x 64, towers of 32)
    keep in-process scoring of 200 candidates around a millisecond (``bench/heavy_ranker.py``).

    ``num_threads`` is torch's intra-op thread count during training; use 1 when other processes
    share the cores (two OpenMP threads waiting on a descheduled sibling ran up to ~7x slower in
    our measurements).
    """

    hidden: tuple[int, ...] = (64,)
    n_experts: int = 4
    tower: int = 32
    prior_offset: bool = True
    prior_eps: float = 1e-4
    id_embedding_dim: int = 8
    id_min_count: int = 5
    # off: on KuaiRand's validation days attention did not beat the history features' counts
    # (ablation: long_view request GAUC -0.014 with it, outside the seed spread; README)
    sequence_attention: bool = False
    attention_hidden: int = 32
    rank_loss_weight: float = 0.0
    rank_context: tuple[str, ...] = ("request_id",)
    dropout: float = 0.1
    learning_rate: float = 1e-3
    weight_decay: float = 1e-6
    batch_size: int = 512
    max_epochs: int = 20
    patience: int = 3
    max_pos_weight: float = 50.0
    seed: int = 7
    num_threads: int = 2

    def as_dict(self) -> dict:
        d = asdict(self)
        d["hidden"] = "-".join(str(h) for h in self.hidden)
        return d


@dataclass
class HeavyRankerFit:
    """A trained, calibrated heavy ranker and what training measured.

    Attributes:
        model: the calibrated :class:`HeavyRankerNet` in eval mode.
        pos_weight: per-head BCE positive weights ``{head: float}``.
        platt: per-head ``{head: (a, b)}``.
        epochs: epochs run; best_epoch: epoch whose weights were kept (1-based).
        calibration_loss: weighted BCE on the calibration day at ``best_epoch``.
        fit_rows / calibration_rows: row counts; seconds: wall-clock training time.
    """

    model: HeavyRankerNet
    pos_weight: dict[str, float]
    platt: dict[str, tuple[float, float]]
    epochs: int
    best_epoch: int
    calibration_loss: float
    fit_rows: int
    calibration_rows: int
    seconds: float

    @property
    def feature_names(self) -> tuple[str, ...]:
        return self.model.feature_names

    @property
    def heads(self) -> tuple[str, ...]:
        return self.model.heads

    def predict(self, frame: pd.DataFrame) -> np.ndarray:
        """Calibrated probabilities ``float32 [N, H]`` for a frame with the feature columns."""
        return predict_module(self.model, feature_matrix(frame, self.feature_names))

    def predict_uncalibrated(self, frame: pd.DataFrame) -> np.ndarray:
        """``sigmoid(logits)`` before Platt scaling, ``float32 [N, H]`` (for calibration checks)."""
        x = torch.from_numpy(feature_matrix(frame, self.feature_names))
        self.model.eval()
        with torch.no_grad():
            return torch.sigmoid(self.model.logits(x)).numpy()


def predict_module(module: nn.Module, x: np.ndarray, batch_size: int = 65536) -> np.ndarray:
    """Run a heavy-ranker module (eager or exported) on ``x`` ``float32 [N, F]`` -> ``[N, H]``."""
    outs = []
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            outs.append(module(torch.from_numpy(np.ascontiguousarray(x[i:i + batch_size]))).numpy())
    if not outs:
        raise ValueError("predict_module needs at least one row")
    return np.concatenate(outs).astype(np.float32, copy=False)


def _label_matrix(frame: pd.DataFrame, heads: Sequence[str]) -> np.ndarray:
    missing = [h for h in heads if h not in frame.columns]
    if missing:
        raise KeyError(f"frame lacks label column(s) {missing}; training sets carry every head of schema.HEADS")
    y = frame[list(heads)].to_numpy(dtype=np.float32)
    if np.isnan(y).any() or not np.isin(y, (0.0, 1.0)).all():
        raise ValueError(f"label columns {list(heads)} must be 0/1 without missing values")
    return y


def context_ids(frame: pd.DataFrame, columns: Sequence[str]) -> np.ndarray:
    """Dense int64 context id per row ``[N]`` from the present ``columns`` (one context if none)."""
    present = [c for c in columns if c in frame.columns]
    if not present:
        return np.zeros(len(frame), dtype=np.int64)
    return pd.MultiIndex.from_frame(frame[present]).factorize()[0].astype(np.int64)


def context_softmax_loss(logits: torch.Tensor, labels: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """Listwise loss per head, summed over heads: ``[N, H]`` logits, 0/1 labels, ``[N]`` context ids.

    For each head and each context with at least one positive and one negative,
    ``-(1/|P|) sum_{i in P} (z_i - logsumexp_{j in context} z_j)``; averaged over those contexts
    (0 for a head without any). Source: the listwise part of JRC (Sheng et al. 2023).
    """
    _, group = torch.unique(context, return_inverse=True)
    n_groups = int(group.max()) + 1 if len(group) else 0
    if n_groups == 0:
        return logits.sum() * 0.0
    idx = group.unsqueeze(1).expand_as(logits)
    gmax = torch.full((n_groups, logits.shape[1]), -torch.inf).scatter_reduce(0, idx, logits.detach(), "amax")
    lse = torch.log(torch.zeros(n_groups, logits.shape[1]).index_add(0, group, torch.exp(logits - gmax[group]))) + gmax
    size = torch.zeros(n_groups).index_add(0, group, torch.ones(len(group)))
    npos = torch.zeros(n_groups, logits.shape[1]).index_add(0, group, labels)
    valid = (npos > 0) & (npos < size.unsqueeze(1))
    per_group = torch.zeros(n_groups, logits.shape[1]).index_add(0, group, labels * (logits - lse[group]))
    per_group = torch.where(valid, per_group / npos.clamp(min=1.0), torch.zeros_like(per_group))
    return -(per_group.sum(dim=0) / valid.sum(dim=0).clamp(min=1)).sum()


def _context_batches(context: np.ndarray, batch_size: int, gen: torch.Generator) -> list[torch.Tensor]:
    """Row indices in mini-batches of about ``batch_size`` rows that keep every context whole."""
    order = np.argsort(context, kind="stable")
    starts = np.flatnonzero(np.r_[True, context[order][1:] != context[order][:-1]])
    bounds = np.r_[starts, len(order)]
    perm = torch.randperm(len(starts), generator=gen).numpy()
    batches, current, rows = [], [], 0
    for g in perm:
        current.append(order[bounds[g]:bounds[g + 1]])
        rows += bounds[g + 1] - bounds[g]
        if rows >= batch_size:
            batches.append(torch.from_numpy(np.concatenate(current)))
            current, rows = [], 0
    if current:
        batches.append(torch.from_numpy(np.concatenate(current)))
    return batches


def fit_heavy_ranker(
    train: pd.DataFrame,
    params: HeavyRankerParams | None = None,
    feature_names: Sequence[str] = HEAVY_RANKER_FEATURES,
    heads: Sequence[str] = HEADS,
) -> HeavyRankerFit:
    """Train the multi-task network on all but the last day of ``train``, then calibrate.

    Args:
        train: training set with ``date``, label columns ``heads`` (0/1) and ``feature_names``.
        params: settings (default :class:`HeavyRankerParams`).
        feature_names: input columns (default ``schema.HEAVY_RANKER_FEATURES``).
        heads: output heads (default ``schema.HEADS``).

    Returns:
        :class:`HeavyRankerFit` whose ``model`` outputs calibrated probabilities.

    Raises:
        ValueError: fewer than 2 days, labels not 0/1.
        KeyError / MissingFeaturesError: label or feature columns missing.

    Torch's intra-op thread count is set to ``params.num_threads`` during training and restored.
    """
    params = params or HeavyRankerParams()
    started = time.monotonic()
    names, heads = tuple(feature_names), tuple(heads)
    fit_df, cal_df = split_calibration_day(train)
    x_fit, x_cal = feature_matrix(fit_df, names), feature_matrix(cal_df, names)
    y_fit, y_cal = _label_matrix(fit_df, heads), _label_matrix(cal_df, heads)

    pos = y_fit.sum(axis=0)
    neg = len(y_fit) - pos
    pos_weight = np.clip(np.sqrt(neg / np.maximum(pos, 1.0)), 1.0, params.max_pos_weight).astype(np.float32)

    prev_threads = torch.get_num_threads()
    torch.set_num_threads(params.num_threads)
    try:
        gen = torch.Generator().manual_seed(params.seed)
        torch.manual_seed(params.seed)  # parameter init and dropout
        norm = InputNormalisation.fit(x_fit, names)
        model = HeavyRankerNet(norm, heads, params.hidden, params.tower, params.dropout,
                               n_experts=params.n_experts, prior_offset=params.prior_offset,
                               prior_eps=params.prior_eps, id_embedding_dim=params.id_embedding_dim,
                               id_vocab=id_vocabulary(x_fit, names, params.id_min_count),
                               sequence_attention=params.sequence_attention,
                               attention_hidden=params.attention_hidden)
        loss_fn = nn.BCEWithLogitsLoss(pos_weight=torch.from_numpy(pos_weight), reduction="none")
        opt = torch.optim.Adam(model.parameters(), lr=params.learning_rate, weight_decay=params.weight_decay)
        xt, yt = torch.from_numpy(x_fit), torch.from_numpy(y_fit)
        xc, yc = torch.from_numpy(x_cal), torch.from_numpy(y_cal)
        ctx_fit = context_ids(fit_df, params.rank_context)
        ct, cc = torch.from_numpy(ctx_fit), torch.from_numpy(context_ids(cal_df, params.rank_context))
        lam = float(params.rank_loss_weight)

        def objective(z: torch.Tensor, y: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
            loss = loss_fn(z, y).mean(dim=0).sum()
            return loss + lam * context_softmax_loss(z, y, ctx) if lam > 0 else loss

        def cal_loss() -> float:
            model.eval()
            with torch.no_grad():
                return float(objective(model.logits(xc), yc, cc))

        best_loss, best_state, best_epoch, bad, epoch = math.inf, None, 0, 0, 0
        for epoch in range(1, params.max_epochs + 1):
            model.train()
            batches = _context_batches(ctx_fit, params.batch_size, gen) if lam > 0 else \
                torch.randperm(len(xt), generator=gen).split(params.batch_size)
            for idx in batches:
                loss = objective(model.logits(xt[idx]), yt[idx], ct[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            val = cal_loss()
            if val < best_loss - 1e-5:
                best_loss, best_state, best_epoch, bad = val, copy.deepcopy(model.state_dict()), epoch, 0
            else:
                bad += 1
                if bad >= params.patience:
                    break
        model.load_state_dict(best_state)
        model.eval()
        with torch.no_grad():
            z_cal = model.logits(xc).numpy()
        platt = {h: fit_platt(z_cal[:, j], y_cal[:, j]) for j, h in enumerate(heads)}
        model.set_calibration(np.array([platt[h][0] for h in heads]), np.array([platt[h][1] for h in heads]))
    finally:
        torch.set_num_threads(prev_threads)
    return HeavyRankerFit(
        model=model,
        pos_weight={h: float(w) for h, w in zip(heads, pos_weight)},
        platt=platt,
        epochs=epoch,
        best_epoch=best_epoch,
        calibration_loss=best_loss,
        fit_rows=len(fit_df),
        calibration_rows=len(cal_df),
        seconds=time.monotonic() - started,
    )
