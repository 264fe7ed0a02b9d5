"""Verification .bin loading and the insightface 10-fold protocol, checked against brute-force references."""

import pickle

import cv2
import numpy as np
import pytest

from plsc.data.verification_bin import VerificationSet, load_bin, read_bin, save_bin
from plsc.errors import PlscError
from plsc.eval.verification import (
    THRESHOLDS,
    combine_flip,
    embed_verification_set,
    evaluate,
    fold_bounds,
    pair_distances,
    tar_at_far,
    verify,
    xnorm,
)

# ------------------------------------------------------------- brute-force references (loops, no shortcuts)


def reference_folds(count, nfolds):
    """Fold membership lists as sklearn KFold(shuffle=False) makes them."""
    folds, start = [], 0
    for fold in range(nfolds):
        size = count // nfolds + (1 if fold < count % nfolds else 0)
        folds.append(list(range(start, start + size)))
        start += size
    return folds


def reference_distances(embeddings):
    pairs = range(len(embeddings) // 2)
    return np.array([np.sum((embeddings[2 * i] - embeddings[2 * i + 1]) ** 2) for i in pairs])


def naive_accuracy(dist, issame, indices, threshold):
    correct = sum(1 for i in indices if (dist[i] < threshold) == issame[i])
    return correct / len(indices)


def reference_kfold(embeddings, issame, nfolds=10):
    dist = reference_distances(embeddings)
    folds = reference_folds(len(issame), nfolds)
    accuracies, thresholds = [], []
    for test in folds:
        train = [i for i in range(len(issame)) if i not in set(test)]
        best_accuracy, best_threshold = -1.0, None
        for threshold in THRESHOLDS:
            accuracy = naive_accuracy(dist, issame, train, threshold)
            if accuracy > best_accuracy:  # strict '>' keeps the first maximum
                best_accuracy, best_threshold = accuracy, threshold
        accuracies.append(naive_accuracy(dist, issame, test, best_threshold))
        thresholds.append(best_threshold)
    return float(np.mean(accuracies)), float(np.std(accuracies)), float(np.mean(thresholds))


def reference_tar_at_far(embeddings, issame, far_target, nfolds=10):
    """Largest training threshold with FAR <= target (FAR steps only at different-pair distances); TAR."""
    dist = reference_distances(embeddings)
    rates = []
    for test in reference_folds(len(issame), nfolds):
        train = [i for i in range(len(issame)) if i not in set(test)]
        different = [dist[i] for i in train if not issame[i]]
        best = None
        for candidate in sorted(set(different)) + [np.inf]:
            false_accepts = sum(1 for d in different if d < candidate)
            if false_accepts / len(different) <= far_target:
                best = candidate
        positives = [dist[i] for i in test if issame[i]]
        if positives:
            rates.append(sum(1 for d in positives if d < best) / len(positives))
    return float(np.mean(rates))


def structured_embeddings(pairs, dim=16, noise=0.9, seed=0, decimals=None):
    """Unit embeddings: same pairs are noisy copies, different pairs independent; rounding makes ties."""
    rng = np.random.default_rng(seed)
    issame = rng.random(pairs) < 0.5
    first = rng.normal(size=(pairs, dim))
    copies = first + noise * rng.normal(size=(pairs, dim))
    second = np.where(issame[:, None], copies, rng.normal(size=(pairs, dim)))
    embeddings = np.empty((2 * pairs, dim))
    embeddings[0::2], embeddings[1::2] = first, second
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    if decimals is not None:
        embeddings = np.round(embeddings, decimals)
    return embeddings, issame


def pairs_at(distance_pairs):
    """2-d unit embeddings with pair distances exactly 0 (same vector), 2 (orthogonal) or 4 (opposite)."""
    vectors = {0.0: [1.0, 0.0], 2.0: [0.0, 1.0], 4.0: [-1.0, 0.0]}
    rows = []
    for distance in distance_pairs:
        rows += [[1.0, 0.0], vectors[distance]]
    return np.array(rows)


# ---------------------------------------------------------------- protocol


def test_fold_bounds_match_kfold_layout():
    assert fold_bounds(95, 10) == [
        (0, 10),
        (10, 20),
        (20, 30),
        (30, 40),
        (40, 50),
        (50, 59),
        (59, 68),
        (68, 77),
        (77, 86),
        (86, 95),
    ]
    for count in (10, 95, 600, 601):
        assert [list(range(a, b)) for a, b in fold_bounds(count, 10)] == reference_folds(count, 10)


@pytest.mark.parametrize("pairs,seed,decimals", [(95, 1, None), (600, 2, None), (203, 3, 1), (10, 4, None)])
def test_evaluate_matches_brute_force(pairs, seed, decimals):
    embeddings, issame = structured_embeddings(pairs, seed=seed, decimals=decimals)
    result = evaluate(embeddings, issame)
    accuracy, std, threshold = reference_kfold(embeddings, issame)
    assert result["pairs"] == pairs
    assert result["accuracy"] == pytest.approx(accuracy, abs=1e-12)
    assert result["std"] == pytest.approx(std, abs=1e-12)
    assert result["threshold"] == pytest.approx(threshold, abs=1e-12)
    assert 0.6 < result["accuracy"] < 1.0  # the structure is learnable but not trivially separable


def test_pair_distances_are_squared_l2():
    embeddings, _ = structured_embeddings(50, seed=5)
    np.testing.assert_allclose(pair_distances(embeddings), reference_distances(embeddings), rtol=1e-12)


def test_hand_case_first_best_threshold():
    # Each fold of 10: 4 same pairs at distance 0, 1 same pair at 4 (never accepted), 5 different pairs at 2.
    # Any threshold in (0, 2] gets 9/10 right on the other fold; the first such grid value is 0.01.
    fold = [0.0] * 4 + [4.0] + [2.0] * 5
    issame = np.array(([True] * 5 + [False] * 5) * 2)
    result = evaluate(pairs_at(fold * 2), issame, nfolds=2)
    assert result["accuracy"] == pytest.approx(0.9)
    assert result["std"] == 0.0
    assert result["threshold"] == pytest.approx(0.01)


def test_distance_equal_to_threshold_counts_as_different():
    assert THRESHOLDS[200] == 2.0  # the grid hits 2.0 exactly, so the tie below is a real tie
    # Same pairs at exactly 2.0, different pairs at 4.0: with strict '<' the threshold 2.0 rejects the same
    # pairs, so the first perfect threshold is 2.01 (with '<=' it would be 2.0).
    issame = np.array([True, False] * 10)
    result = evaluate(pairs_at([2.0, 4.0] * 10), issame)
    assert result["accuracy"] == 1.0
    assert result["threshold"] == pytest.approx(2.01)
    folds = fold_bounds(len(issame), 10)
    assert tar_at_far(np.array([2.0, 4.0] * 10), issame, folds, 0.0) == 1.0  # threshold 4.0 accepts 2.0


@pytest.mark.parametrize("far_target", [0.0, 1e-3, 0.01, 0.05, 0.3])
@pytest.mark.parametrize("pairs,seed,decimals", [(95, 6, None), (600, 7, None), (300, 8, 1)])
def test_tar_at_far_matches_brute_force(pairs, seed, decimals, far_target):
    embeddings, issame = structured_embeddings(pairs, noise=0.6, seed=seed, decimals=decimals)
    expected = reference_tar_at_far(embeddings, issame, far_target)
    dist = pair_distances(embeddings)
    assert tar_at_far(dist, issame, fold_bounds(pairs, 10), far_target) == pytest.approx(expected, abs=1e-12)
    if far_target == 1e-3:
        assert evaluate(embeddings, issame)["tar_at_far_1e-3"] == pytest.approx(expected, abs=1e-12)


def test_tar_at_far_hand_case():
    # 40 pairs alternating same (distance 0.25) and different (0.1, 0.2, ..., 2.0); folds of 4 pairs, so
    # fold 0 holds the different pairs at 0.1 and 0.2 and every training set has N = 18 different pairs.
    # The threshold is the (floor(target * 18) + 1)-th smallest training different distance:
    #   target 0    -> 1st: 0.3 for fold 0 (accepts 0.25), 0.1 elsewhere (rejects)  -> TAR 1/10
    #   target 0.1  -> 2nd: 0.4 for fold 0, 0.2 elsewhere (rejects)                  -> TAR 1/10
    #   target 0.15 -> 3rd: 0.5 for fold 0, 0.3 elsewhere (accepts)                  -> TAR 1
    dist = np.empty(40)
    dist[0::2], dist[1::2] = 0.25, np.round(np.arange(1, 21) * 0.1, 10)
    issame = np.array([True, False] * 20)
    folds = fold_bounds(40, 10)
    assert tar_at_far(dist, issame, folds, 0.0) == pytest.approx(0.1)
    assert tar_at_far(dist, issame, folds, 0.1) == pytest.approx(0.1)
    assert tar_at_far(dist, issame, folds, 0.15) == pytest.approx(1.0)


def test_evaluate_rejects_bad_shapes():
    embeddings, issame = structured_embeddings(20)
    with pytest.raises(PlscError, match="embeddings"):
        evaluate(embeddings[:-2], issame)
    with pytest.raises(PlscError, match="folds"):
        evaluate(embeddings[:10], issame[:5])


def test_combine_flip_and_xnorm():
    combined = combine_flip(np.array([[3.0, 0.0], [0.0, 0.0]]), np.array([[0.0, 3.0], [0.0, 0.0]]))
    np.testing.assert_allclose(combined, [[2**-0.5, 2**-0.5], [0.0, 0.0]])  # zero rows stay finite
    assert xnorm(np.array([[3.0, 4.0], [0.0, 2.0]])) == pytest.approx(3.5)
    with pytest.raises(PlscError):
        combine_flip(np.zeros((2, 3)), np.zeros((2, 4)))


# ---------------------------------------------------------------- embedding


def small_set(count=5, size=8):
    rng = np.random.default_rng(10)
    images = rng.integers(0, 256, size=(2 * count, size, size, 3), dtype=np.uint8)
    return VerificationSet(images=images, issame=np.array([True, False] * count)[:count], name="small")


@pytest.mark.parametrize("data_format", ["NCHW", "NHWC"])
def test_embed_feeds_normalised_batches_and_mirrors(data_format):
    vset = small_set()
    seen = []

    def flatten(batch):
        seen.append((batch.shape, batch.dtype))
        nhwc = batch.transpose(0, 2, 3, 1) if data_format == "NCHW" else batch
        return nhwc.reshape(len(batch), -1)

    raw, raw_flipped = embed_verification_set(flatten, vset, batch_size=4, data_format=data_format)
    expected = (vset.images.astype(np.float32) / 255 - 0.5) / 0.5
    np.testing.assert_allclose(raw, expected.reshape(10, -1), atol=1e-6)
    np.testing.assert_allclose(raw_flipped, expected[:, :, ::-1].reshape(10, -1), atol=1e-6)
    layout = (3, 8, 8) if data_format == "NCHW" else (8, 8, 3)
    assert seen == [((4, *layout), np.float32)] * 4 + [((2, *layout), np.float32)] * 2
    assert raw.dtype == np.float32


def test_verify_adds_xnorm_and_checks_arguments(monkeypatch, caplog):
    monkeypatch.setattr("plsc.console.LOG_INTERVAL_S", 0.0)  # a progress line after every batch
    caplog.set_level("INFO", logger="plsc")
    vset = small_set(count=20)
    result = verify(lambda batch: batch.reshape(len(batch), -1) * 2, vset, batch_size=7, progress=True)
    assert set(result) == {"accuracy", "std", "threshold", "tar_at_far_1e-3", "pairs", "xnorm"}
    assert result["pairs"] == 20 and result["xnorm"] > 0
    assert caplog.records and all(r.getMessage().startswith("verify small: ") for r in caplog.records)
    with pytest.raises(PlscError, match="data_format"):
        verify(lambda batch: batch, vset, data_format="CHWN")
    with pytest.raises(PlscError, match="shape"):
        verify(lambda batch: batch[:1].reshape(1, -1), vset)


# ---------------------------------------------------------------- .bin files


def raw_pickle(path):
    with open(path, "rb") as handle:
        return pickle.load(handle, encoding="bytes")


def check_loaded(vset, path, pairs):
    encoded, flags = raw_pickle(path)
    assert vset.pairs == pairs and vset.name == path.stem
    assert vset.images.shape == (2 * pairs, 112, 112, 3) and vset.images.dtype == np.uint8
    assert vset.issame.dtype == bool and vset.issame.sum() == sum(flags)
    bgr = cv2.imdecode(np.frombuffer(encoded[3], np.uint8), cv2.IMREAD_COLOR)
    np.testing.assert_array_equal(vset.images[3], bgr[:, :, ::-1])  # stored RGB


def test_load_bundled_bin(tiny_dir):
    path = tiny_dir / "lfw_disjoint_100.bin"
    check_loaded(load_bin(path), path, 100)


def test_read_bin_counts_the_pairs_and_decodes_later_like_load_bin(tiny_dir):
    path = tiny_dir / "lfw_disjoint_100.bin"
    with open(path, "rb") as f:
        encoded, issame = pickle.load(f, encoding="bytes")  # insightface's own reading of the file
    read = read_bin(path)
    assert read.images == len(encoded) == 2 * len(issame) == 200
    decoded, loaded = read.decode(32), load_bin(path, 32)
    np.testing.assert_array_equal(decoded.images, loaded.images)
    np.testing.assert_array_equal(decoded.issame, np.asarray(issame, dtype=bool))
    assert decoded.name == loaded.name == "lfw_disjoint_100"


def test_load_shared_bin(shared_dir):
    path = shared_dir / "data" / "faces-mini" / "lfw_disjoint.bin"
    vset = load_bin(path)
    check_loaded(vset, path, 600)
    assert vset.issame.sum() == 300


def test_raw_pixels_score_near_chance_plus(shared_dir):
    # The protocol on real data: flattened normalised pixels with flip-combine score ~0.615 on lfw_disjoint.
    vset = load_bin(shared_dir / "data" / "faces-mini" / "lfw_disjoint.bin")
    result = verify(lambda batch: batch.reshape(len(batch), -1), vset, batch_size=100, data_format="NHWC")
    assert 0.55 <= result["accuracy"] <= 0.70


def encode_jpegs(count, size=64, seed=11):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(count, size, size, 3), dtype=np.uint8)
    return [cv2.imencode(".jpg", image)[1].tobytes() for image in images]


def test_save_load_round_trip(tmp_path, tiny_dir):
    encoded, flags = raw_pickle(tiny_dir / "lfw_disjoint_100.bin")
    path = tmp_path / "copy.bin"
    save_bin(path, encoded, flags)
    assert raw_pickle(path) == (encoded, flags)
    np.testing.assert_array_equal(load_bin(path).images, load_bin(tiny_dir / "lfw_disjoint_100.bin").images)
    assert [p.name for p in tmp_path.iterdir()] == ["copy.bin"]  # no temp file left behind


def test_load_resizes_to_image_size(tmp_path):
    path = tmp_path / "small.bin"
    save_bin(path, encode_jpegs(4), [True, False])
    assert load_bin(path).images.shape == (4, 112, 112, 3)
    assert load_bin(path, image_size=(32, 48)).images.shape == (4, 32, 48, 3)


def test_save_bin_rejects_count_mismatch(tmp_path):
    with pytest.raises(PlscError, match="3 images for 2 pairs"):
        save_bin(tmp_path / "bad.bin", encode_jpegs(3), [True, False])
    assert not list(tmp_path.iterdir())


class Boom:
    def __reduce__(self):
        return (print, ("code ran while unpickling",))


@pytest.mark.parametrize(
    "payload,message",
    [
        (b"this is not a pickle at all", "cannot unpickle"),
        (b"", "cannot unpickle"),
        (pickle.dumps({"images": [], "issame": []}), "expected a pickled"),
        (pickle.dumps(("images", [True])), "expected \\(list"),
        (pickle.dumps(([b"x"] * 3, [True, False])), "3 images for 2 pairs"),
        (pickle.dumps(([], [])), "no pairs"),
        (pickle.dumps(([b"x", b"y"], ["yes"])), "booleans"),
        (pickle.dumps(([b"x", 5], [True])), "image 1 has type int"),
        (pickle.dumps(Boom()), "refusing to load the global builtins.print"),
    ],
    ids=["text", "empty", "dict", "not-lists", "count", "no-pairs", "not-bool", "not-bytes", "code"],
)
def test_bad_bin_files_raise_one_line_errors(tmp_path, payload, message, capsys):
    path = tmp_path / "bad.bin"
    path.write_bytes(payload)
    with pytest.raises(PlscError, match=message) as caught:
        load_bin(path)
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)
    assert "code ran" not in capsys.readouterr().out


def test_corrupt_jpeg_names_its_index(tmp_path):
    encoded = encode_jpegs(4)
    encoded[2] = encoded[2][:50]  # truncated beyond recovery
    path = tmp_path / "corrupt.bin"
    save_bin(path, encoded, [True, False])
    with pytest.raises(PlscError, match="image 2 cannot be decoded") as caught:
        load_bin(path)
    assert str(path) in str(caught.value)


def test_missing_file(tmp_path):
    with pytest.raises(PlscError, match="cannot read"):
        load_bin(tmp_path / "absent.bin")
