"""Two-tower retrieval model: a user tower over the user action sequence, an item tower over posts.

Both towers end in L2-normalised ``dim``-D vectors; a user's retrieval score of a post is their
inner product (cosine similarity), so the catalogue's item vectors go into an ANN index
(``models.ann_index``) and a candidate source asks it for the user vector's nearest posts
(the YouTube / Google two-tower retrieval of Covington et al., RecSys 2016 and Yi et al., 2019).

Training data (point in time): the users' engagement sequences before a cutoff
(``pipelines.sequences.engagement_sequences``: log and pre-log engagements, distinct posts, oldest
first). Every engagement at position t >= 1 of a user's sequence is one example: the history is the
user's last ``max_sequence_length`` engagements before it (newest first, as the mixer's
``Query.action_sequence`` holds them), the label is the engaged post. Nothing at or after the
cutoff enters (the sequences are cut there; :func:`training_examples` can cut earlier still).

Item tower (``TwoTowerNet.item_vectors``): post-id embedding (posts not seen in training share row
0, the OOV row), author-id embedding (OOV row 0 likewise), primary-tag embedding, and content
features of the canonical posts table (``log1p`` duration standardised plus a missing flag, ad /
unknown video type) -> MLP -> L2 normalisation. During training each post id (and author id) is
replaced by the OOV row with probability ``id_dropout``, so the OOV rows learn what a post is
worth from its author, tag and content alone: a post created after training still gets a useful
embedding.

User tower (``TwoTowerNet.user_vectors``): each sequence entry is the sum of the item tower's
post-id and author embeddings (shared tables), an action embedding (``ACTION_STRENGTH``) and a
position embedding (0 = newest); attention pooling (softmax over the entries of a logit that is a
linear function of the entry plus a learned recency term per position and a learned term per
action: recency- and action-weighted pooling whose weights are learned) and mean pooling, plus
the history length, -> MLP -> L2 normalisation. Training packs sequences (no padding:
:class:`PackedSequences`; the median history is 13 entries, the maximum 64). It needs only
what the mixer has at request time, ``[(post_id, author_id, action), ...]`` newest first, so
:meth:`TwoTowerFit.user_embeddings` runs per request (one forward per batch); there the
sequences are padded to ``max_sequence_length`` (:func:`user_tower_inputs`, shared with the
ONNX export that Triton serves, ``serving.user_tower_export``) and the same tower runs on the
padded batch (``user_vectors_padded``). User features
(the user view) are left out: they would need a second online read on the request path and the
sequence already carries the user's history, pre-log history included.

Loss: in-batch sampled softmax with the logQ correction of Yi et al., "Sampling-Bias-Corrected
Neural Modeling for Large Corpus Item Recommendations" (RecSys 2019), eq. 3-4: for a batch of B
(user, item) pairs,
    logit[i, j] = <u_i, v_j> / temperature - log q(item_j)
    loss = mean_i  -log softmax_j(logit[i, :])[i]
where q(item) is the probability that the item is in a batch as a positive, i.e. its frequency
among the training examples (the paper estimates it by streaming; here it is counted exactly, the
data fits in memory). In-batch negatives are sampled by popularity; subtracting log q removes that
bias (otherwise popular posts are pushed down as negatives far more often than they are pulled up).
Other rows whose item is the row's own positive item (in-batch duplicates) are masked out of the
softmax: they are not negatives.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from models.split import held_out_days

from pipelines.sequences import ACTION_STRENGTH

# Content features of the item tower, in model order.
CONTENT_FEATURES: tuple[str, ...] = ("log_duration_z", "duration_missing", "is_ad", "video_type_unknown")
# Columns of the canonical posts table (core.schema.POSTS_COLUMNS) the item tower reads.
ITEM_COLUMNS: tuple[str, ...] = ("post_id", "author_id", "primary_tag", "duration_ms", "video_type")
SEQUENCE_NEED: tuple[str, ...] = ("user_id", "post_id", "author_id", "action", "ts")
WEIGHTS_FILE = "weights.pt"
CONFIG_FILE = "config.json"
VOCAB_FILE = "vocab.npz"


@dataclass(frozen=True)
class TwoTowerParams:
    """Settings of the two-tower model and its training.

    Attributes:
        dim: output dimension D of both towers (64: YouTube's candidate generation found gains
            flatten past 64-256 dims, Covington et al. 2016 fig. 6; the ANN bench's 1M x 64).
        id_dim: width of the post-id and author-id embeddings (one width: the user tower sums
            them per sequence entry); tag_dim: width of the primary-tag embedding.
        hidden: width of each tower's hidden layer (one hidden layer per tower, ReLU).
        epochs: passes over the training examples (4: the held-out recall flattens after 3-4 on
            KuaiRand; see ``models.train.train_two_tower``).
        batch_size: examples per step = in-batch negatives + 1 (Yi et al. 2019 train with
            batches of thousands; 1024 keeps a CPU step cheap).
        lr: Adam learning rate (3e-3: fast convergence for shallow embedding models).
        weight_decay: Adam L2 penalty (0: id dropout is the regulariser).
        temperature: softmax temperature tau of the normalised dot product (Yi et al. 2019 tune
            tau; 0.05 is a common value for unit vectors in in-batch softmax, e.g. sentence
            embeddings; not tuned on this data).
        max_sequence_length: history entries the user tower reads (64: the online store keeps
            the last 64 per user, ``pipelines.candidate_index.DEFAULT_SEQUENCE_LENGTH``).
        id_dropout: probability of replacing a post / author id with the OOV row in training
            (item tower only), so unseen posts get meaningful vectors.
        min_history: examples need at least this many earlier engagements (1).
        seed: seeds parameter init, shuffling and id dropout (the global torch RNG is restored).
        num_threads: torch intra-op threads during training (restored afterwards). 1: a step's
            tensors are small (a batch is ~12k sequence entries x 64), so a second thread gains
            little, while OpenMP threads spin-waiting on a descheduled sibling slow training many
            times over when other processes share the 2 cores (measured on the full KuaiRand
            data under load: one epoch > 200 s with 2 threads, ~45 s with 1).
    """

    dim: int = 64
    id_dim: int = 64
    tag_dim: int = 16
    hidden: int = 128
    epochs: int = 4
    batch_size: int = 1024
    lr: float = 3e-3
    weight_decay: float = 0.0
    temperature: float = 0.05
    max_sequence_length: int = 64
    id_dropout: float = 0.1
    min_history: int = 1
    seed: int = 0
    num_threads: int = 1

    def as_dict(self) -> dict:
        """Flat dict for MLflow params."""
        return asdict(self)

    def validate(self) -> "TwoTowerParams":
        """Raise ValueError naming the first invalid setting; returns self."""
        for name in ("dim", "id_dim", "tag_dim", "hidden", "epochs", "max_sequence_length",
                     "min_history", "num_threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"TwoTowerParams.{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_size < 2:
            raise ValueError(f"TwoTowerParams.batch_size must be >= 2 (in-batch negatives), got {self.batch_size}")
        if not self.lr > 0 or not self.temperature > 0 or self.weight_decay < 0:
            raise ValueError(f"need lr > 0, temperature > 0, weight_decay >= 0; got {self.lr}, "
                             f"{self.temperature}, {self.weight_decay}")
        if not 0 <= self.id_dropout < 1:
            raise ValueError(f"TwoTowerParams.id_dropout must be in [0, 1), got {self.id_dropout}")
        return self


# ---------------------------------------------------------------- cutoffs


def validation_cutoff(impressions: pd.DataFrame, valid_days: int) -> tuple[list[int], pd.Timestamp]:
    """The last ``valid_days`` dates of the log and their start (``models.split.held_out_days``):
    a model trained on data before the returned instant is evaluated on the returned days."""
    return held_out_days(impressions, valid_days)


def _utc_seconds(ts) -> float:
    t = pd.Timestamp(ts)
    t = t.tz_localize("UTC") if t.tzinfo is None else t.tz_convert("UTC")
    return t.value / 1e9


# ---------------------------------------------------------------- examples


@dataclass(frozen=True)
class TrainingExamples:
    """Next-engagement examples over flat per-user sequences.

    Attributes (E events, N examples):
        post_id, author_id: int64 ``[E]``; action: int64 ``[E]`` (index in ``ACTION_STRENGTH``,
            -1 unknown); ts: float64 ``[E]`` epoch seconds; user_id: int64 ``[E]``. Events are
            sorted by (user, ts), oldest first.
        user_start: int64 ``[E]``: index of the first event of the event's user.
        targets: int64 ``[N]``: event indices that are labels; the history of target ``t`` is
            events ``user_start[t] .. t-1``.
    """

    user_id: np.ndarray
    post_id: np.ndarray
    author_id: np.ndarray
    action: np.ndarray
    ts: np.ndarray
    user_start: np.ndarray
    targets: np.ndarray

    def __len__(self) -> int:
        return int(len(self.targets))

    def histories(self, targets: np.ndarray, max_length: int) -> "PackedSequences":
        """History windows of ``targets`` (event indices), newest first, at most ``max_length`` each,
        packed (:class:`PackedSequences`, ``batch = len(targets)``)."""
        t = np.asarray(targets, dtype=np.int64)
        lengths = np.minimum(t - self.user_start[t], max_length)
        segment = np.repeat(np.arange(len(t), dtype=np.int64), lengths)
        offsets = np.cumsum(lengths) - lengths
        position = np.arange(int(lengths.sum()), dtype=np.int64) - np.repeat(offsets, lengths)
        event = np.repeat(t, lengths) - 1 - position
        return PackedSequences(self.post_id[event], self.author_id[event], self.action[event], position,
                               segment, len(t))


@dataclass(frozen=True)
class PackedSequences:
    """A batch of B action sequences as T flat entries (no padding: most histories are far shorter
    than the maximum, so a padded [B, L] batch would be mostly padding).

    Attributes:
        post, author, action: int64 ``[T]`` per entry (embedding rows or raw values, see caller).
        position: int64 ``[T]``: 0 = the sequence's newest entry.
        segment: int64 ``[T]``: the sequence (0..B-1) each entry belongs to, non-decreasing.
        batch: B (sequences may be empty: no entry has their segment).
    """

    post: np.ndarray
    author: np.ndarray
    action: np.ndarray
    position: np.ndarray
    segment: np.ndarray
    batch: int

    def tensors(self):
        """The torch inputs of ``TwoTowerNet.user_vectors``."""
        torch = _torch()
        return (torch.from_numpy(self.post), torch.from_numpy(self.author), torch.from_numpy(self.action),
                torch.from_numpy(self.position), torch.from_numpy(self.segment), self.batch)


@dataclass(frozen=True)
class UserTowerInputs:
    """A batch of B request-time action sequences as the user tower's padded inputs: what both the
    in-process tower (``TwoTowerNet.user_vectors_padded``) and its ONNX export (served by Triton)
    read, made by one function (:func:`user_tower_inputs`) so the two paths cannot disagree.

    Attributes (L = the model's ``max_sequence_length``; entry ``j`` of row ``i`` is the user's
    ``j``-th newest engagement, position ``j``):
        post, author: int64 ``[B, L]`` embedding rows (0 = OOV and padding).
        action: int64 ``[B, L]`` action rows (0 = unknown action and padding).
        mask: float32 ``[B, L]``: 1.0 for an entry, 0.0 for padding (rows are left-aligned).
    """

    post: np.ndarray
    author: np.ndarray
    action: np.ndarray
    mask: np.ndarray

    NAMES = ("post", "author", "action", "mask")  # the ONNX inputs, in this order

    @property
    def batch(self) -> int:
        return int(self.post.shape[0])

    def arrays(self) -> dict[str, np.ndarray]:
        """``{input name: array}`` in :attr:`NAMES` order (the ONNX / Triton feed)."""
        return {name: getattr(self, name) for name in self.NAMES}

    def tensors(self):
        """The torch inputs of ``TwoTowerNet.user_vectors_padded`` (zero-copy views)."""
        torch = _torch()
        return tuple(torch.from_numpy(a) for a in self.arrays().values())


def user_tower_inputs(sequences: Sequence[Sequence[tuple[int, int, str]]], post_vocab: np.ndarray,
                      author_vocab: np.ndarray, max_length: int) -> UserTowerInputs:
    """Padded user-tower inputs of request-time action sequences: the id lookups and padding that
    stay in Python before the tower's graph (in-process or ONNX).

    Args:
        sequences: per user ``[(post_id, author_id, action), ...]`` newest first; longer tuples
            are read by their first three fields (``EngagedAction``); only the first ``max_length``
            entries are read; ``[]`` is a user without history.
        post_vocab / author_vocab: sorted int64 ids with an embedding row each (row ``i + 1``);
            unknown ids get row 0 (OOV). An action outside ``ACTION_STRENGTH`` gets row 0.
        max_length: L, the padded width (the model's ``max_sequence_length``).

    Returns:
        :class:`UserTowerInputs` of ``[len(sequences), max_length]``.

    Raises:
        ValueError: an entry has fewer than 3 fields, or its ids are not integers.
    """
    strength = {a: i + 1 for i, a in enumerate(ACTION_STRENGTH)}
    b = len(sequences)
    posts: list[int] = []
    authors: list[int] = []
    actions: list[int] = []
    lengths = np.zeros(b, dtype=np.int64)
    for i, seq in enumerate(sequences):
        seq = seq[:max_length]
        for entry in seq:
            if len(entry) < 3:
                raise ValueError(f"sequence {i} holds {entry!r}: expected (post_id, author_id, action) triples")
            posts.append(entry[0])
            authors.append(entry[1])
            actions.append(strength.get(entry[2], 0))
        lengths[i] = len(seq)
    try:
        post = np.asarray(posts, dtype=np.int64)
        author = np.asarray(authors, dtype=np.int64)
    except (TypeError, ValueError, OverflowError):
        raise ValueError("post and author ids of the sequences must be integers") from None
    filled = np.arange(max_length)[None, :] < lengths[:, None]  # [B, L], row-major = entry order
    out = {name: np.zeros((b, max_length), dtype=np.int64) for name in ("post", "author", "action")}
    out["post"][filled] = _lookup(post_vocab, post)
    out["author"][filled] = _lookup(author_vocab, author)
    out["action"][filled] = np.asarray(actions, dtype=np.int64)
    return UserTowerInputs(**out, mask=filled.astype(np.float32))


def training_examples(sequences: pd.DataFrame, before=None, min_history: int = 1) -> TrainingExamples:
    """(history, next engaged post) examples from ``engagement_sequences`` output.

    Args:
        sequences: ``pipelines.sequences.SEQUENCE_COLUMNS`` (user_id, post_id, author_id, action,
            ts epoch s), e.g. ``engagement_sequences(impressions, prelog_events, as_of)``.
        before: optional cutoff (Timestamp, tz-aware or naive UTC): events at or after it are
            dropped first, so neither a label nor any history entry is at or after it.
        min_history: a label needs at least this many earlier events of its user.

    Returns:
        :class:`TrainingExamples` (possibly with zero examples).

    Raises:
        ValueError: a column is missing, or ``min_history < 0``.
    """
    missing = [c for c in SEQUENCE_NEED if c not in sequences.columns]
    if missing:
        raise ValueError(f"sequences lack columns {missing}: pass pipelines.sequences.engagement_sequences output")
    if min_history < 0:
        raise ValueError(f"min_history must be >= 0, got {min_history}")
    seq = sequences
    if before is not None:
        seq = seq[seq["ts"].to_numpy(dtype="float64") < _utc_seconds(before)]
    seq = seq.sort_values(["user_id", "ts"], kind="stable")
    users = seq["user_id"].to_numpy(dtype="int64")
    n = len(users)
    new_user = np.ones(n, dtype=bool)
    if n:
        new_user[1:] = users[1:] != users[:-1]
    first = np.flatnonzero(new_user)
    user_start = np.repeat(first, np.diff(np.append(first, n))) if n else np.zeros(0, dtype=np.int64)
    position = np.arange(n, dtype=np.int64) - user_start
    strength = {a: i for i, a in enumerate(ACTION_STRENGTH)}
    action = np.fromiter((strength.get(a, -1) for a in seq["action"]), dtype=np.int64, count=n)
    return TrainingExamples(
        user_id=users, post_id=seq["post_id"].to_numpy(dtype="int64"),
        author_id=seq["author_id"].to_numpy(dtype="int64"), action=action,
        ts=seq["ts"].to_numpy(dtype="float64"), user_start=user_start.astype(np.int64),
        targets=np.flatnonzero(position >= min_history).astype(np.int64),
    )


# ---------------------------------------------------------------- item features


def _lookup(vocab: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Row of each id in an embedding whose row ``i + 1`` is ``vocab[i]`` (sorted); 0 = OOV."""
    ids = np.asarray(ids, dtype=np.int64)
    if len(vocab) == 0:
        return np.zeros(ids.shape, dtype=np.int64)
    pos = np.searchsorted(vocab, ids)
    clipped = np.minimum(pos, len(vocab) - 1)
    return np.where(vocab[clipped] == ids, clipped + 1, 0).astype(np.int64)


def _check_posts(posts: pd.DataFrame) -> None:
    missing = [c for c in ITEM_COLUMNS if c not in posts.columns]
    if missing:
        raise ValueError(f"posts lack columns {missing}: pass the canonical posts table "
                         "(pd.read_parquet(state.table('posts')), core.schema.POSTS_COLUMNS)")


def _content(posts: pd.DataFrame, mean: float, std: float) -> np.ndarray:
    """float32 ``[N, len(CONTENT_FEATURES)]`` content features of ``posts``."""
    dur = pd.to_numeric(posts["duration_ms"], errors="coerce").to_numpy(dtype="float64")
    missing = ~np.isfinite(dur) | (dur < 0)
    logd = np.log1p(np.where(missing, 0.0, dur) / 1000.0)
    z = np.where(missing, 0.0, (logd - mean) / std)
    vtype = posts["video_type"].astype("string").fillna("UNKNOWN").str.upper().to_numpy(dtype=object)
    return np.stack([z, missing, vtype == "AD", ~np.isin(vtype, ["NORMAL", "AD"])], axis=1).astype(np.float32)


# ---------------------------------------------------------------- the network


def _torch():
    import torch

    return torch


def build_net(n_posts: int, n_authors: int, n_tags: int, params: TwoTowerParams):
    """The two towers as one ``torch.nn.Module`` (embedding row 0 of each id table is OOV).

    Args:
        n_posts / n_authors / n_tags: vocabulary sizes (rows = size + 1).
    """
    import torch
    from torch import nn

    class TwoTowerNet(nn.Module):
        """Item tower ``item_vectors`` and user tower ``user_vectors`` (module docstring)."""

        def __init__(self):
            super().__init__()
            p = params
            self.post_emb = nn.Embedding(n_posts + 1, p.id_dim)
            self.author_emb = nn.Embedding(n_authors + 1, p.id_dim)
            self.tag_emb = nn.Embedding(n_tags + 1, p.tag_dim)
            self.item_mlp = nn.Sequential(
                nn.Linear(2 * p.id_dim + p.tag_dim + len(CONTENT_FEATURES), p.hidden), nn.ReLU(),
                nn.Linear(p.hidden, p.dim))
            self.action_emb = nn.Embedding(len(ACTION_STRENGTH) + 1, p.id_dim)  # row 0: unknown action
            self.position_emb = nn.Embedding(p.max_sequence_length, p.id_dim)
            # attention logit of an entry: content term + learned recency and action terms
            self.attention = nn.Linear(p.id_dim, 1)
            self.position_logit = nn.Embedding(p.max_sequence_length, 1)
            self.action_logit = nn.Embedding(len(ACTION_STRENGTH) + 1, 1)
            for emb in (self.post_emb, self.author_emb, self.tag_emb, self.action_emb, self.position_emb):
                nn.init.normal_(emb.weight, std=0.05)
            for emb in (self.position_logit, self.action_logit):
                nn.init.zeros_(emb.weight)
            self.user_mlp = nn.Sequential(nn.Linear(2 * p.id_dim + 1, p.hidden), nn.ReLU(), nn.Linear(p.hidden, p.dim))
            self.max_len = p.max_sequence_length

        def item_vectors(self, post, author, tag, content):
            """int64 rows ``[B]`` x3 (post, author, tag) + float32 ``[B, C]`` -> float32 ``[B, D]``, unit rows."""
            x = torch.cat([self.post_emb(post), self.author_emb(author), self.tag_emb(tag), content], dim=-1)
            return nn.functional.normalize(self.item_mlp(x), dim=-1)

        def user_vectors(self, post, author, action, position, segment, batch: int):
            """Packed sequences (``PackedSequences.tensors()``: int64 ``[T]`` post / author / action
            rows, positions, segments; B) -> float32 ``[B, D]``, unit rows; an empty sequence gives
            the learned cold-start vector."""
            h = self.post_emb(post) + self.author_emb(author) + self.action_emb(action) + self.position_emb(position)
            score = (self.attention(h) + self.position_logit(position) + self.action_logit(action)).squeeze(-1)
            # softmax per sequence; logits clamped instead of max-subtracted (no segment max in torch)
            w = torch.exp(score.clamp(-15.0, 15.0))
            den = torch.zeros(batch, dtype=h.dtype).index_add(0, segment, w)
            attended = torch.zeros(batch, h.shape[1], dtype=h.dtype).index_add(0, segment, w.unsqueeze(-1) * h)
            attended = attended / den.clamp_min(1e-12).unsqueeze(-1)
            count = torch.zeros(batch, dtype=h.dtype).index_add(0, segment, torch.ones_like(w))
            mean = torch.zeros(batch, h.shape[1], dtype=h.dtype).index_add(0, segment, h) / count.clamp_min(1.0).unsqueeze(-1)
            depth = torch.log1p(count) / math.log1p(self.max_len)
            return nn.functional.normalize(self.user_mlp(torch.cat([attended, mean, depth.unsqueeze(-1)], dim=-1)), dim=-1)

        def user_vectors_padded(self, post, author, action, mask):
            """The user tower on padded sequences (``UserTowerInputs.tensors()``: int64 ``[B, L]``
            post / author / action rows, float32 ``[B, L]`` mask, L = ``max_sequence_length``) ->
            float32 ``[B, D]``, unit rows. The same function as :meth:`user_vectors` (padding is
            masked out of both poolings and the count; sums taken per row instead of by
            ``index_add``, so results agree to float rounding); traceable by ``torch.export`` with
            a dynamic batch dimension (no Python ints from the data), hence the served and
            exported request path."""
            positions = self.position_emb.weight[: post.shape[1]].unsqueeze(0)  # position j = j-th newest
            h = self.post_emb(post) + self.author_emb(author) + self.action_emb(action) + positions
            score = (self.attention(h).squeeze(-1) + self.position_logit.weight[: post.shape[1], 0].unsqueeze(0)
                     + self.action_logit(action).squeeze(-1))
            w = torch.exp(score.clamp(-15.0, 15.0)) * mask  # clamped as in user_vectors
            attended = (w.unsqueeze(-1) * h).sum(1) / w.sum(1).clamp_min(1e-12).unsqueeze(-1)
            count = mask.sum(1)
            mean = (mask.unsqueeze(-1) * h).sum(1) / count.clamp_min(1.0).unsqueeze(-1)
            depth = torch.log1p(count) / math.log1p(self.max_len)
            return nn.functional.normalize(self.user_mlp(torch.cat([attended, mean, depth.unsqueeze(-1)], dim=-1)), dim=-1)

    return TwoTowerNet()


def user_tower_module(net):
    """The user tower of a ``TwoTowerNet`` as its own ``torch.nn.Module`` whose ``forward(post,
    author, action, mask)`` is ``net.user_vectors_padded`` (shares the parameters; what
    ``torch.onnx.export`` converts)."""
    from torch import nn

    class UserTower(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, post, author, action, mask):
            return self.net.user_vectors_padded(post, author, action, mask)

    return UserTower().eval()


def sampled_softmax_logq_loss(user, item, item_ids, log_q, temperature: float):
    """In-batch sampled softmax with logQ correction (Yi et al., RecSys 2019; module docstring).

    Args:
        user: float ``[B, D]`` user vectors (row i's positive is ``item[i]``).
        item: float ``[B, D]`` item vectors.
        item_ids: int64 ``[B]``: item identity of each row (rows with the same id are duplicates
            of one positive and are masked out of each other's negatives).
        log_q: float ``[B]``: log of each row's item sampling probability.
        temperature: > 0.

    Returns:
        Scalar tensor: mean over rows of ``-log softmax(logits[i])[i]`` with
        ``logits[i, j] = <user_i, item_j> / temperature - log_q[j]``, ``-inf`` where ``j != i``
        and ``item_ids[j] == item_ids[i]``.

    Raises:
        ValueError: shapes disagree or ``temperature <= 0``.
    """
    torch = _torch()
    if user.shape != item.shape or user.ndim != 2 or item_ids.shape != (user.shape[0],) \
            or log_q.shape != (user.shape[0],):
        raise ValueError(f"need user, item [B, D], item_ids and log_q [B]; got {tuple(user.shape)}, "
                         f"{tuple(item.shape)}, {tuple(item_ids.shape)}, {tuple(log_q.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    logits = user @ item.T / temperature - log_q.unsqueeze(0)
    duplicate = (item_ids.unsqueeze(0) == item_ids.unsqueeze(1)) & ~torch.eye(
        len(item_ids), dtype=torch.bool, device=item_ids.device)
    logits = logits.masked_fill(duplicate, float("-inf"))
    labels = torch.arange(len(item_ids), device=item_ids.device)
    return torch.nn.functional.cross_entropy(logits, labels)


# ---------------------------------------------------------------- the fitted model


@dataclass
class TwoTowerFit:
    """A trained two-tower model: the network plus its vocabularies and feature statistics.

    Attributes:
        net: the torch module (eval mode).
        params: the settings it was trained with.
        post_vocab / author_vocab / tag_vocab: sorted int64 ids with an embedding row each
            (row ``i + 1``; row 0 is OOV).
        duration_mean / duration_std: statistics of ``log1p(duration s)`` (content feature).
        stats: training facts (examples, users, epochs, seconds, last epoch's loss, ...).
    """

    net: object = field(repr=False)
    params: TwoTowerParams
    post_vocab: np.ndarray = field(repr=False)
    author_vocab: np.ndarray = field(repr=False)
    tag_vocab: np.ndarray = field(repr=False)
    duration_mean: float = 0.0
    duration_std: float = 1.0
    stats: dict = field(default_factory=dict)

    @property
    def dim(self) -> int:
        """Output dimension D."""
        return self.params.dim

    def _item_inputs(self, posts: pd.DataFrame):
        torch = _torch()
        tags = pd.to_numeric(posts["primary_tag"], errors="coerce").fillna(-1).to_numpy(dtype="int64")
        return (torch.from_numpy(_lookup(self.post_vocab, posts["post_id"].to_numpy(dtype="int64"))),
                torch.from_numpy(_lookup(self.author_vocab, posts["author_id"].to_numpy(dtype="int64"))),
                torch.from_numpy(_lookup(self.tag_vocab, tags)),
                torch.from_numpy(_content(posts, self.duration_mean, self.duration_std)))

    def item_embeddings(self, posts: pd.DataFrame, batch_size: int = 65536) -> tuple[np.ndarray, np.ndarray]:
        """Item-tower vectors of ``posts`` (unseen posts / authors / tags use the OOV rows).

        Args:
            posts: rows with ``ITEM_COLUMNS`` (the canonical posts table); post ids distinct.
            batch_size: rows per forward.

        Returns:
            ``(post_id int64 [N], vectors float32 [N, D])``, unit rows, in the frame's order.

        Raises:
            ValueError: no rows, a column missing, or repeated post ids.
        """
        torch = _torch()
        _check_posts(posts)
        if len(posts) == 0:
            raise ValueError("no posts to embed: pass the catalogue (the canonical posts table)")
        ids = posts["post_id"].to_numpy(dtype="int64")
        if len(np.unique(ids)) != len(ids):
            raise ValueError("posts repeat post ids: pass one row per post (drop_duplicates('post_id'))")
        out = []
        self.net.eval()
        with torch.inference_mode():
            for s in range(0, len(posts), batch_size):
                out.append(self.net.item_vectors(*self._item_inputs(posts.iloc[s:s + batch_size])).numpy())
        return ids.copy(), np.ascontiguousarray(np.concatenate(out), dtype=np.float32)

    def user_tower_inputs(self, sequences: Sequence[Sequence[tuple[int, int, str]]]) -> UserTowerInputs:
        """Padded inputs of request-time sequences for this model's vocabularies
        (:func:`user_tower_inputs`; the in-process and the Triton paths both start here)."""
        return user_tower_inputs(sequences, self.post_vocab, self.author_vocab, self.params.max_sequence_length)

    def user_embeddings(self, sequences: Sequence[Sequence[tuple[int, int, str]]]) -> np.ndarray:
        """User-tower vectors of request-time action sequences (one forward for the batch).

        Args:
            sequences: per user, ``[(post_id, author_id, action), ...]`` newest first (the mixer's
                ``core.online_layout.decode_action`` members; longer tuples are read by their first
                three fields, so the mixer's ``Query.action_sequence`` of ``EngagedAction(post_id,
                author_id, action, ts)`` is taken as it is); only the first ``max_sequence_length``
                are read. An empty list is a user without history
                (a learned cold-start vector). Unknown posts / authors use the OOV rows, an
                unknown action string the unknown-action row.

        Returns:
            float32 ``[B, D]``, unit rows (``[0, D]`` for an empty batch).

        Raises:
            ValueError: an entry has fewer than 3 fields, or its ids are not integers.
        """
        if len(sequences) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        return self.user_vectors(self.user_tower_inputs(sequences))

    def user_vectors(self, inputs: UserTowerInputs) -> np.ndarray:
        """The user tower in-process on padded inputs (:meth:`user_tower_inputs`): float32 ``[B, D]``,
        unit rows. ``serving.user_tower_export`` checks the ONNX export against this."""
        torch = _torch()
        self.net.eval()
        with torch.inference_mode():
            out = self.net.user_vectors_padded(*inputs.tensors())
        return np.ascontiguousarray(out.numpy(), dtype=np.float32)

    # ------------------------------------------------------------ persistence

    def save(self, path: Path | str) -> Path:
        """Write ``weights.pt`` (state dict), ``config.json`` and ``vocab.npz`` into folder ``path``."""
        torch = _torch()
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(self.net.state_dict(), folder / WEIGHTS_FILE)
        np.savez(folder / VOCAB_FILE, post=self.post_vocab, author=self.author_vocab, tag=self.tag_vocab)
        (folder / CONFIG_FILE).write_text(json.dumps({
            "params": self.params.as_dict(), "duration_mean": self.duration_mean,
            "duration_std": self.duration_std, "content_features": list(CONTENT_FEATURES),
            "actions": list(ACTION_STRENGTH), "stats": self.stats,
        }, indent=1, default=float))
        return folder

    @classmethod
    def load(cls, path: Path | str) -> "TwoTowerFit":
        """Read a folder written by :meth:`save` (weights loaded with ``weights_only=True``).

        Raises:
            FileNotFoundError: a file is missing.
            ValueError: the saved features or actions differ from this code's (re-train).
        """
        torch = _torch()
        folder = Path(path)
        for name in (WEIGHTS_FILE, CONFIG_FILE, VOCAB_FILE):
            if not (folder / name).is_file():
                raise FileNotFoundError(f"{folder / name} is missing: not a two-tower folder (TwoTowerFit.save writes it)")
        cfg = json.loads((folder / CONFIG_FILE).read_text())
        if cfg["content_features"] != list(CONTENT_FEATURES) or cfg["actions"] != list(ACTION_STRENGTH):
            raise ValueError(f"{folder} was trained with features {cfg['content_features']} / actions "
                             f"{cfg['actions']}, this code has {list(CONTENT_FEATURES)} / {list(ACTION_STRENGTH)}: re-train it")
        params = TwoTowerParams(**cfg["params"])
        vocab = np.load(folder / VOCAB_FILE)
        net = build_net(len(vocab["post"]), len(vocab["author"]), len(vocab["tag"]), params)
        net.load_state_dict(torch.load(folder / WEIGHTS_FILE, weights_only=True))
        net.eval()
        return cls(net=net, params=params, post_vocab=vocab["post"].astype(np.int64),
                   author_vocab=vocab["author"].astype(np.int64), tag_vocab=vocab["tag"].astype(np.int64),
                   duration_mean=float(cfg["duration_mean"]), duration_std=float(cfg["duration_std"]),
                   stats=cfg.get("stats", {}))


# ---------------------------------------------------------------- training


def fit_two_tower(sequences: pd.DataFrame, posts: pd.DataFrame, params: TwoTowerParams | None = None, *,
                  before=None, log: Callable[[str], None] | None = None, progress: bool = True) -> TwoTowerFit:
    """Train the two towers on next-engagement examples of ``sequences`` (module docstring).

    Args:
        sequences: ``engagement_sequences`` output, all before the training cutoff.
        posts: the canonical posts table (``ITEM_COLUMNS``): item features of labels; posts
            engaged in ``sequences`` but absent here get unknown tag / content.
        params: settings (default ``TwoTowerParams()``).
        before: optional earlier cutoff: events at or after it are not used (a held-out window).
        log: receives one line per epoch (None: silent).
        progress: a tqdm bar over epochs (on stderr).

    Returns:
        :class:`TwoTowerFit` (its ``stats``: examples, users, posts / authors / tags in the
        vocabularies, epochs, seconds, epoch losses).

    Raises:
        ValueError: invalid params, missing columns, or no training examples (no user has
            ``min_history + 1`` engagements before the cutoff: use a later cutoff or more data).
    """
    import torch
    from tqdm.auto import tqdm

    params = (params or TwoTowerParams()).validate()
    _check_posts(posts)
    ex = training_examples(sequences, before=before, min_history=params.min_history)
    if len(ex) == 0:
        raise ValueError(
            f"no training examples: {len(ex.post_id)} engagements before the cutoff, none with "
            f">= {params.min_history} earlier engagements of the same user; move the cutoff later or "
            "give more data (impressions with engaged labels, pre-log sequences)")
    started = time.monotonic()
    post_vocab = np.unique(ex.post_id)
    author_vocab = np.unique(ex.author_id)
    meta = posts.drop_duplicates("post_id", keep="last").set_index("post_id")
    target_posts = ex.post_id[ex.targets]
    known = pd.Index(meta.index).get_indexer(target_posts)
    tags_all = pd.to_numeric(meta["primary_tag"], errors="coerce").fillna(-1).to_numpy(dtype="int64")
    in_meta = pd.Index(meta.index).get_indexer(post_vocab)
    vocab_tags = tags_all[in_meta[in_meta >= 0]]  # primary tags of the posts seen in training
    tag_vocab = np.unique(vocab_tags[vocab_tags >= 0])
    # duration statistics over the posts seen in training (not the whole table: later posts are unknown)
    dur = pd.to_numeric(meta["duration_ms"], errors="coerce").to_numpy(dtype="float64")[in_meta[in_meta >= 0]]
    ok = np.isfinite(dur) & (dur >= 0)
    logd = np.log1p(dur[ok] / 1000.0)
    d_mean = float(logd.mean()) if len(logd) else 0.0
    d_std = float(logd.std()) if len(logd) > 1 and logd.std() > 0 else 1.0

    # item inputs of every label (the post's row in `meta`, or unknown tag / missing content)
    unknown_row = pd.DataFrame({"post_id": [-1], "author_id": [-1], "primary_tag": [-1],
                                "duration_ms": [np.nan], "video_type": ["UNKNOWN"]})
    table = pd.concat([meta.reset_index()[list(ITEM_COLUMNS)], unknown_row], ignore_index=True)
    rows = np.where(known >= 0, known, len(table) - 1)
    item_post = _lookup(post_vocab, target_posts)
    item_author = _lookup(author_vocab, ex.author_id[ex.targets])  # the sequence's author of the label
    table_tags = pd.to_numeric(table["primary_tag"], errors="coerce").fillna(-1).to_numpy(dtype="int64")
    item_tag = _lookup(tag_vocab, table_tags[rows])
    item_content = _content(table, d_mean, d_std)[rows]
    counts = np.bincount(item_post, minlength=len(post_vocab) + 1).astype(np.float64)
    log_q = np.log(counts[item_post] / len(ex)).astype(np.float32)
    seq_post = _lookup(post_vocab, ex.post_id)
    seq_author = _lookup(author_vocab, ex.author_id)
    seq_action = ex.action + 1  # -1 unknown -> row 0
    flat = TrainingExamples(ex.user_id, seq_post, seq_author, seq_action, ex.ts, ex.user_start, ex.targets)

    threads = torch.get_num_threads()
    torch.set_num_threads(params.num_threads)
    losses: list[float] = []
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(params.seed)
            net = build_net(len(post_vocab), len(author_vocab), len(tag_vocab), params)
            opt = torch.optim.Adam(net.parameters(), lr=params.lr, weight_decay=params.weight_decay)
            rng = np.random.default_rng(params.seed)
            n = len(ex)
            bar = tqdm(range(params.epochs), desc="two-tower", unit="epoch", disable=not progress, leave=False)
            for epoch in bar:
                net.train()
                order = rng.permutation(n)
                total, steps = 0.0, 0
                for s in range(0, n, params.batch_size):
                    b = order[s:s + params.batch_size]
                    if len(b) < 2:
                        continue
                    history = flat.histories(flat.targets[b], params.max_sequence_length)
                    ip, ia = item_post[b].copy(), item_author[b].copy()
                    if params.id_dropout > 0:
                        ip[rng.random(len(b)) < params.id_dropout] = 0
                        ia[rng.random(len(b)) < params.id_dropout] = 0
                    u = net.user_vectors(*history.tensors())
                    v = net.item_vectors(torch.from_numpy(ip), torch.from_numpy(ia),
                                         torch.from_numpy(item_tag[b]), torch.from_numpy(item_content[b]))
                    loss = sampled_softmax_logq_loss(u, v, torch.from_numpy(item_post[b]),
                                                     torch.from_numpy(log_q[b]), params.temperature)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    total += float(loss.detach())
                    steps += 1
                losses.append(total / max(steps, 1))
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
                if log:
                    log(f"[two-tower] epoch {epoch + 1}/{params.epochs}: loss {losses[-1]:.4f} "
                        f"({time.monotonic() - started:.0f} s)")
            net.eval()
    finally:
        torch.set_num_threads(threads)
    stats = {"examples": int(len(ex)), "users": int(len(np.unique(ex.user_id[ex.targets]))),
             "events": int(len(ex.post_id)), "vocab_posts": int(len(post_vocab)),
             "vocab_authors": int(len(author_vocab)), "vocab_tags": int(len(tag_vocab)),
             "labels_without_post_row": int((known < 0).sum()), "epochs": params.epochs,
             "seconds": round(time.monotonic() - started, 2), "epoch_losses": [round(x, 5) for x in losses]}
    return TwoTowerFit(net=net, params=params, post_vocab=post_vocab, author_vocab=author_vocab,
                       tag_vocab=tag_vocab, duration_mean=d_mean, duration_std=d_std, stats=stats)


# ---------------------------------------------------------------- held-out evaluation


def latest_histories(sequences: pd.DataFrame, before, max_length: int) -> dict[int, list[tuple[int, int, str]]]:
    """Each user's last ``max_length`` engagements strictly before ``before``, newest first, as the
    mixer's action sequence holds them: ``{user_id: [(post_id, author_id, action), ...]}``."""
    seq = sequences[sequences["ts"].to_numpy(dtype="float64") < _utc_seconds(before)]
    seq = seq.sort_values(["user_id", "ts"], kind="stable", ascending=[True, False])
    seq = seq[seq.groupby("user_id").cumcount() < max_length]
    out: dict[int, list[tuple[int, int, str]]] = {}
    for u, p, a, act in zip(seq["user_id"].to_numpy(), seq["post_id"].to_numpy(), seq["author_id"].to_numpy(),
                            seq["action"].to_numpy()):
        out.setdefault(int(u), []).append((int(p), int(a), str(act)))
    return out


def next_engagement_recall(fit: TwoTowerFit, search: Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]],
                           sequences: pd.DataFrame, start, end, ks: Sequence[int] = (100, 200),
                           popular: np.ndarray | None = None) -> dict[str, float]:
    """Held-out recall@K of the user vectors' top K for the posts users engage with in ``[start, end)``.

    Each user with an engagement in the window gets the user vector of their history before
    ``start`` (the last ``max_sequence_length`` engagements, newest first); the top ``K`` of
    ``search`` (e.g. ``AnnIndex.search``), with the user's history posts removed (the mixer filters
    seen posts), is compared with the posts engaged in the window that are not in that history:
    recall@K = mean over users of ``|top K ∩ P| / |P|``.

    Args:
        search: ``(queries float32 [Q, D], k) -> (ids int64 [Q, k], scores)``.
        sequences: ``engagement_sequences`` built as of ``end`` (or later: events at or after
            ``end`` are ignored).
        ks: cut-offs (>= 1).
        popular: optional int64 post ids, most popular first: the same recall of that list (the
            popularity baseline, minus each user's history) is reported as ``popular_recall_at_K``.

    Returns:
        ``{"recall_at_K": ..., "popular_recall_at_K": ..., "users": n, "cold_users": users without
        history}`` (recall NaN when no user has a positive).

    Raises:
        ValueError: a K < 1.
    """
    if not ks or min(ks) < 1:
        raise ValueError(f"cut-offs must be >= 1, got {ks}")
    ts = sequences["ts"].to_numpy(dtype="float64")
    window = sequences[(ts >= _utc_seconds(start)) & (ts < _utc_seconds(end))]
    history = latest_histories(sequences, start, fit.params.max_sequence_length)
    full_history: dict[int, set[int]] = {}
    before = sequences[ts < _utc_seconds(start)]
    for u, p in zip(before["user_id"].to_numpy(), before["post_id"].to_numpy()):
        full_history.setdefault(int(u), set()).add(int(p))
    users, positives = [], []
    for u, posts in window.groupby("user_id")["post_id"]:
        pos = set(int(p) for p in posts) - full_history.get(int(u), set())
        if pos:
            users.append(int(u))
            positives.append(pos)
    out: dict[str, float] = {"users": float(len(users)),
                             "cold_users": float(sum(1 for u in users if u not in history))}
    if not users:
        return {**out, **{f"recall_at_{k}": float("nan") for k in ks}}
    kmax = max(ks)
    hits = {k: [] for k in ks}
    pop_hits = {k: [] for k in ks}
    for s in range(0, len(users), 4096):
        chunk = users[s:s + 4096]
        vecs = fit.user_embeddings([history.get(u, []) for u in chunk])
        extra = max((len(full_history.get(u, ())) for u in chunk), default=0)
        ids, _ = search(vecs, kmax + extra)
        for row, u, pos in zip(ids, chunk, positives[s:s + 4096]):
            seen = full_history.get(u, set())
            ranked = [int(p) for p in row if p >= 0 and int(p) not in seen][:kmax]
            pop = [int(p) for p in popular[:kmax + len(seen)] if int(p) not in seen][:kmax] if popular is not None else []
            for k in ks:
                hits[k].append(len(pos.intersection(ranked[:k])) / len(pos))
                if popular is not None:
                    pop_hits[k].append(len(pos.intersection(pop[:k])) / len(pos))
    for k in ks:
        out[f"recall_at_{k}"] = float(np.mean(hits[k]))
        if popular is not None:
            out[f"popular_recall_at_{k}"] = float(np.mean(pop_hits[k]))
    return out


__all__ = ["CONTENT_FEATURES", "ITEM_COLUMNS", "TrainingExamples", "TwoTowerFit", "TwoTowerParams", "UserTowerInputs",
           "build_net", "fit_two_tower", "latest_histories", "next_engagement_recall", "sampled_softmax_logq_loss",
           "training_examples", "user_tower_inputs", "user_tower_module", "validation_cutoff"]
