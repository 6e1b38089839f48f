"""The two-tower retrieval model: point-in-time examples, the logQ-corrected loss, learning a
planted signal, request-time user embeddings, persistence and errors."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from models.ann_index import AnnIndex, set_threads
from models.two_tower import (
    TwoTowerFit, TwoTowerParams, build_net, fit_two_tower, latest_histories, next_engagement_recall,
    sampled_softmax_logq_loss, training_examples, validation_cutoff,
)
from pipelines.sequences import ACTION_STRENGTH, ENGAGED_HEADS, engagement_sequences

set_threads(1)
T0 = pd.Timestamp("2022-04-25T00:00:00Z")
TOPICS, POSTS_PER_TOPIC, USERS = 20, 20, 400
FAST = TwoTowerParams(dim=16, id_dim=16, tag_dim=8, hidden=32, epochs=12, batch_size=256, lr=1e-2,
                      temperature=0.1, num_threads=1)


def _posts(post_ids, topic_of) -> pd.DataFrame:
    return pd.DataFrame({
        "post_id": np.asarray(post_ids, dtype="int64"),
        "author_id": 10_000 + np.asarray(post_ids, dtype="int64"),  # one author per post
        "created_ts": T0 - pd.Timedelta(days=10),
        "duration_ms": 20_000.0 + 1000.0 * (np.asarray(post_ids) % 7),
        "video_type": "NORMAL",
        "tags": [str(topic_of(p)) for p in post_ids],
        "primary_tag": [topic_of(p) for p in post_ids],
    })


@pytest.fixture(scope="module")
def planted():
    """Users who each engage only with posts of one topic (the tag), in random order."""
    rng = np.random.default_rng(0)
    n_posts = TOPICS * POSTS_PER_TOPIC
    topic_of = lambda p: int(p) // POSTS_PER_TOPIC  # noqa: E731
    rows = []
    for u in range(USERS):
        topic = u % TOPICS
        chosen = rng.choice(POSTS_PER_TOPIC, size=12, replace=False) + topic * POSTS_PER_TOPIC
        for i, p in enumerate(chosen):
            rows.append((u, int(p), 10_000 + int(p), ACTION_STRENGTH[i % 2], (T0 + pd.Timedelta(minutes=u * 100 + i)).value / 1e9))
    seq = pd.DataFrame(rows, columns=["user_id", "post_id", "author_id", "action", "ts"])
    posts = _posts(np.arange(n_posts), topic_of)
    last = seq.groupby("user_id").tail(1)
    train = seq.drop(last.index)
    fit = fit_two_tower(train, posts, FAST, progress=False)
    return seq, train, last, posts, fit, topic_of


def _impressions(rows):
    frame = pd.DataFrame(rows, columns=["user_id", "post_id", "author_id", "event_ts", *ENGAGED_HEADS])
    frame["event_ts"] = pd.to_datetime(frame["event_ts"], utc=True)
    return frame


# ---------------------------------------------------------------- point in time


def test_examples_use_nothing_at_or_after_the_cutoff():
    as_of = pd.Timestamp("2022-05-01T00:00:00Z")
    early = as_of - pd.Timedelta(hours=7.5)  # user 1: 3 events before it, 2 after
    rows = [(1, 100 + i, 500, as_of - pd.Timedelta(hours=10 - i), 1, 0, 0, 0, 0) for i in range(5)]
    rows += [(1, 900, 500, as_of, 1, 0, 0, 0, 0),                           # at the cutoff: out
             (1, 901, 500, as_of + pd.Timedelta(hours=1), 0, 1, 0, 0, 0),   # after it: out
             (2, 200, 500, early - pd.Timedelta(hours=2), 1, 0, 0, 0, 0),
             (2, 201, 500, early - pd.Timedelta(hours=1), 1, 0, 0, 0, 0),
             (2, 777, 500, early + pd.Timedelta(hours=1), 1, 0, 0, 0, 0)]  # after `early` only
    seq = engagement_sequences(_impressions(rows), None, as_of)
    ex = training_examples(seq)
    cutoff = as_of.value / 1e9
    assert len(ex) == 4 + 2  # user 1: 5 events -> 4 labels; user 2: 3 events -> 2
    assert (ex.ts < cutoff).all() and not {900, 901} & set(ex.post_id.tolist())
    history = ex.histories(ex.targets, 64)
    # every history entry is an earlier event of the same user, newest first
    for t, seg in zip(ex.targets, range(len(ex))):
        entries = history.post[history.segment == seg]
        start = ex.user_start[t]
        assert entries.tolist() == ex.post_id[start:t][::-1].tolist()
        assert (ex.ts[start:t] < ex.ts[t]).all()
    # an earlier cutoff drops every event at or after it: labels and histories
    ex_early = training_examples(seq, before=early)
    assert (ex_early.ts < early.value / 1e9).all() and not {103, 104, 777} & set(ex_early.post_id.tolist())
    assert len(ex_early) == 2 + 1
    assert len(training_examples(seq, min_history=3)) == 2  # user 1's 4th and 5th events


def test_validation_cutoff_is_the_first_impression_of_the_last_days():
    imp = pd.DataFrame({"date": [20220501, 20220501, 20220502, 20220503, 20220503],
                        "event_ts": pd.to_datetime(["2022-05-01T01:00Z", "2022-05-01T02:00Z", "2022-05-02T05:00Z",
                                                    "2022-05-03T09:00Z", "2022-05-03T03:00Z"], utc=True)})
    days, cutoff = validation_cutoff(imp, 2)
    assert days == [20220502, 20220503] and cutoff == pd.Timestamp("2022-05-02T05:00Z")
    with pytest.raises(ValueError, match="need more than 3 dates"):
        validation_cutoff(imp, 3)


# ---------------------------------------------------------------- the loss


def test_logq_loss_matches_a_hand_computation():
    u = np.array([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [0.8, -0.6]])
    v = np.array([[0.0, 1.0], [1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    ids = np.array([7, 3, 5, 7])  # rows 0 and 3 share their positive item
    q = np.array([0.4, 0.1, 0.2, 0.4])
    tau = 0.5
    expected = []
    for i in range(4):
        logits = [u[i] @ v[j] / tau - math.log(q[j]) for j in range(4) if j == i or ids[j] != ids[i]]
        pos = u[i] @ v[i] / tau - math.log(q[i])
        expected.append(-(pos - math.log(sum(math.exp(z) for z in logits))))
    got = sampled_softmax_logq_loss(torch.tensor(u), torch.tensor(v), torch.tensor(ids),
                                    torch.tensor(np.log(q)), tau)
    assert float(got) == pytest.approx(float(np.mean(expected)), rel=1e-9)
    # without the correction (q uniform) the loss is the plain in-batch softmax: different here
    plain = sampled_softmax_logq_loss(torch.tensor(u), torch.tensor(v), torch.tensor(ids),
                                      torch.zeros(4, dtype=torch.float64), tau)
    assert float(plain) != pytest.approx(float(got))
    with pytest.raises(ValueError, match="temperature"):
        sampled_softmax_logq_loss(torch.tensor(u), torch.tensor(v), torch.tensor(ids), torch.tensor(np.log(q)), 0)
    with pytest.raises(ValueError, match="need user, item"):
        sampled_softmax_logq_loss(torch.tensor(u), torch.tensor(v[:3]), torch.tensor(ids), torch.tensor(np.log(q)), 1)


# ---------------------------------------------------------------- learning


def test_learns_the_planted_topics(planted):
    seq, train, last, posts, fit, topic_of = planted
    ids, vecs = fit.item_embeddings(posts)
    index = AnnIndex.build(ids, vecs, "flat")
    m = next_engagement_recall(fit, index.search, seq, pd.Timestamp(last["ts"].min(), unit="s", tz="UTC"),
                               pd.Timestamp(seq["ts"].max() + 1, unit="s", tz="UTC"), ks=(20,))
    assert m["users"] > 0
    # held-out next posts: each user's last engagement
    histories = [[(int(p), int(a), str(act)) for p, a, act in zip(g["post_id"][::-1], g["author_id"][::-1],
                                                                   g["action"][::-1])]
                 for _, g in train.groupby("user_id")]
    users = fit.user_embeddings(histories)
    top, _ = index.search(users, 20 + 11)
    hits = []
    for row, h, target in zip(top, histories, last["post_id"]):
        seen = {p for p, _, _ in h}
        ranked = [p for p in row if p not in seen][:20]
        hits.append(int(target) in ranked)
    recall = float(np.mean(hits))
    random_recall = 20 / (TOPICS * POSTS_PER_TOPIC - 11)
    assert recall > 0.5 > 5 * random_recall, recall
    # the top of each user's list is from the user's topic
    same_topic = [np.mean([topic_of(p) == u % TOPICS for p in row[:10]]) for u, row in enumerate(top)]
    assert np.mean(same_topic) > 0.8
    # loss went down
    assert fit.stats["epoch_losses"][-1] < fit.stats["epoch_losses"][0]


def test_new_posts_are_embedded_from_author_tag_and_content(planted):
    _, _, _, posts, fit, topic_of = planted
    new = _posts(np.array([10_001, 10_002]), lambda p: 3 if p == 10_001 else 11)
    new["author_id"] = [10_000 + 3 * POSTS_PER_TOPIC, 10_000 + 11 * POSTS_PER_TOPIC]  # known authors of topics 3, 11
    ids, vecs = fit.item_embeddings(new)
    assert ids.tolist() == [10_001, 10_002] and vecs.shape == (2, 16)
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, rtol=1e-5)
    assert not np.allclose(vecs[0], vecs[1])
    # a new post of topic 3 is closer to a topic-3 user than to a topic-11 user
    users = fit.user_embeddings([[(3 * POSTS_PER_TOPIC + i, 10_000 + 3 * POSTS_PER_TOPIC + i, "long_view") for i in range(5)],
                                 [(11 * POSTS_PER_TOPIC + i, 10_000 + 11 * POSTS_PER_TOPIC + i, "long_view") for i in range(5)]])
    scores = users @ vecs.T
    assert scores[0, 0] > scores[1, 0] and scores[1, 1] > scores[0, 1]


# ---------------------------------------------------------------- request time


def test_user_embeddings_shape_dtype_and_norm(planted):
    _, _, _, _, fit, _ = planted
    long = [(i % 400, 10_000 + i % 400, "like") for i in range(100)]  # longer than the 64 read
    seqs = [[(5, 10_005, "long_view"), (7, 10_007, "like")], [], [(999_999, 1, "share")], long]
    out = fit.user_embeddings(seqs)
    assert out.shape == (4, 16) and out.dtype == np.float32 and out.flags["C_CONTIGUOUS"]
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(fit.user_embeddings([long[:64]]), out[3:4], rtol=1e-5, atol=1e-6)
    # one user alone gets the vector it gets in a batch
    np.testing.assert_allclose(fit.user_embeddings(seqs[:1]), out[:1], rtol=1e-5, atol=1e-6)
    assert fit.user_embeddings([]).shape == (0, 16)
    # the mixer's EngagedAction(post_id, author_id, action, ts) entries are read as their triples
    with_ts = [[(p, a, act, 1.65e9 - i) for i, (p, a, act) in enumerate(seqs[0])]]
    np.testing.assert_array_equal(fit.user_embeddings(with_ts), fit.user_embeddings(seqs[:1]))
    with pytest.raises(ValueError, match="triples"):
        fit.user_embeddings([[(1, 2)]])
    with pytest.raises(ValueError, match="must be integers"):
        fit.user_embeddings([[("a", 2, "like")]])


def test_request_time_input_equals_the_training_input(planted):
    """The user tower sees a history the same way in training (packed event windows) and at request
    time (the mixer's newest-first triples)."""
    seq, train, _, _, fit, _ = planted
    ex = training_examples(train)
    targets = ex.targets[[0, 5, 50, len(ex) - 1]]
    raw = ex.histories(targets, fit.params.max_sequence_length)
    from models.two_tower import PackedSequences, _lookup

    packed = PackedSequences(_lookup(fit.post_vocab, raw.post), _lookup(fit.author_vocab, raw.author),
                             raw.action + 1, raw.position, raw.segment, raw.batch)
    with torch.inference_mode():
        trained_path = fit.net.user_vectors(*packed.tensors()).numpy()
    request = [[(int(p), int(a), ACTION_STRENGTH[int(act)]) for p, a, act in
                zip(raw.post[raw.segment == i], raw.author[raw.segment == i], raw.action[raw.segment == i])]
               for i in range(raw.batch)]
    np.testing.assert_allclose(fit.user_embeddings(request), trained_path, rtol=1e-5, atol=1e-6)
    # latest_histories builds the same newest-first lists
    h = latest_histories(train, pd.Timestamp(train["ts"].max() + 1, unit="s", tz="UTC"), 64)
    u0 = train[train.user_id == 0].sort_values("ts", ascending=False)
    assert h[0] == [(int(p), int(a), str(x)) for p, a, x in zip(u0.post_id, u0.author_id, u0.action)]


def test_user_tower_inputs_pad_truncate_and_map_ids(planted):
    """The one tensorisation both the in-process tower and the Triton path use."""
    _, _, _, _, fit, _ = planted
    from models.two_tower import UserTowerInputs, user_tower_inputs

    L = fit.params.max_sequence_length
    long = [(i % 400, 10_000 + i % 400, "like") for i in range(L + 10)]
    seqs = [[(5, 10_005, "long_view", 1.6e9), (999_999, 77, "no_such_action")], [], long]
    x = fit.user_tower_inputs(seqs)
    assert x.arrays().keys() == set(UserTowerInputs.NAMES) and list(x.arrays()) == list(UserTowerInputs.NAMES)
    for name in ("post", "author", "action"):
        assert getattr(x, name).dtype == np.int64 and getattr(x, name).shape == (3, L)
    assert x.mask.dtype == np.float32 and x.mask.shape == (3, L)
    np.testing.assert_array_equal(x.mask.sum(1), [2, 0, L])  # truncated to the newest L
    # entry j of a row is the j-th newest; rows are the vocabularies' rows (+1), OOV / unknown -> 0
    row5 = int(np.searchsorted(fit.post_vocab, 5)) + 1
    assert x.post[0, :2].tolist() == [row5, 0] and x.author[0, 1] == 0
    assert x.action[0, :2].tolist() == [ACTION_STRENGTH.index("long_view") + 1, 0]
    # padding is all zeros, and the first L entries of a long history are read in order
    assert not x.post[0, 2:].any() and not x.post[1].any() and not x.action[1].any()
    np.testing.assert_array_equal(x.post[2], user_tower_inputs([long[:L]], fit.post_vocab, fit.author_vocab, L).post[0])
    assert fit.user_tower_inputs([]).post.shape == (0, L)
    with pytest.raises(ValueError, match="triples"):
        fit.user_tower_inputs([[(1, 2)]])
    # the request path is the tower on exactly these inputs (packed training path: the test below)
    assert np.array_equal(fit.user_vectors(x), fit.user_embeddings(seqs))


def test_the_onnx_user_tower_equals_the_in_process_tower(planted):
    """``torch.onnx.export(dynamo=True)`` of the padded tower, batch dimension dynamic, run by
    onnxruntime on the shared tensorisation: max |diff| <= 1e-5 (and a wrong model is caught)."""
    seq, _, _, _, fit, _ = planted
    from serving.export import ExportMismatchError, onnx_session
    from serving.user_tower_export import INPUT_NAMES, OUTPUT_NAME, check_sequences, user_tower_to_onnx, verify_user_tower

    model = user_tower_to_onnx(fit)
    assert [i.name for i in model.graph.input] == list(INPUT_NAMES)
    histories = list(latest_histories(seq, pd.Timestamp(seq["ts"].max() + 1, unit="s", tz="UTC"), 64).values())
    checked = check_sequences(histories[:200], fit.params.max_sequence_length)
    assert len(checked) == 203 and checked[200] == [] and len(checked[-1]) > fit.params.max_sequence_length
    assert verify_user_tower(model, fit, checked) <= 1e-5
    session = onnx_session(model)
    for batch in (checked[:1], checked[:37]):  # the batch dimension is dynamic, 1 included
        got = session.run([OUTPUT_NAME], fit.user_tower_inputs(batch).arrays())[0]
        assert got.dtype == np.float32 and got.shape == (len(batch), fit.dim)
        np.testing.assert_allclose(got, fit.user_embeddings(batch), rtol=0, atol=1e-5)
    other = TwoTowerFit(net=build_net(len(fit.post_vocab), len(fit.author_vocab), len(fit.tag_vocab), fit.params),
                        params=fit.params, post_vocab=fit.post_vocab, author_vocab=fit.author_vocab,
                        tag_vocab=fit.tag_vocab)
    with pytest.raises(ExportMismatchError, match="differs from the in-process tower"):
        verify_user_tower(model, other, checked)
    with pytest.raises(ValueError, match="no real sequences"):
        check_sequences([[]], 64)


def test_save_and_load_give_the_same_embeddings(planted, tmp_path):
    _, _, _, posts, fit, _ = planted
    fit.save(tmp_path / "towers")
    loaded = TwoTowerFit.load(tmp_path / "towers")
    seqs = [[(5, 10_005, "long_view")], []]
    np.testing.assert_array_equal(loaded.user_embeddings(seqs), fit.user_embeddings(seqs))
    np.testing.assert_array_equal(loaded.item_embeddings(posts)[1], fit.item_embeddings(posts)[1])
    assert loaded.params == fit.params and loaded.stats["examples"] == fit.stats["examples"]


# ---------------------------------------------------------------- errors


def test_clear_errors(planted, tmp_path):
    seq, _, _, posts, fit, _ = planted
    with pytest.raises(ValueError, match="no training examples"):
        fit_two_tower(seq.groupby("user_id").head(1), posts, FAST, progress=False)
    with pytest.raises(ValueError, match="no training examples"):
        fit_two_tower(seq, posts, FAST, before=pd.Timestamp("2000-01-01", tz="UTC"), progress=False)
    with pytest.raises(ValueError, match=r"posts lack columns \['duration_ms'"):
        fit_two_tower(seq, posts.drop(columns=["duration_ms"]), FAST, progress=False)
    with pytest.raises(ValueError, match="sequences lack columns"):
        fit_two_tower(seq.drop(columns=["action"]), posts, FAST, progress=False)
    with pytest.raises(ValueError, match="batch_size must be >= 2"):
        fit_two_tower(seq, posts, TwoTowerParams(batch_size=1), progress=False)
    with pytest.raises(ValueError, match="no posts to embed"):
        fit.item_embeddings(posts.head(0))
    with pytest.raises(ValueError, match="repeat post ids"):
        fit.item_embeddings(pd.concat([posts.head(2), posts.head(2)]))
    with pytest.raises(FileNotFoundError, match="weights.pt"):
        TwoTowerFit.load(tmp_path)
