"""Leaderboard metrics: hand-computed examples, scikit-learn, sacrebleu and rouge-score agreement,
the uncertain policy, bootstrap intervals, CIDEr-D against a direct implementation of its
definition, METEOR's absence said plainly, MS-CXR-T progression answers."""

from __future__ import annotations

import math
import random
from collections import Counter

import numpy as np
import pytest

from cxrmax.core.pathologies import COMPETITION_LABELS, OBSERVATIONS
from cxrmax.leaderboard import metrics, textmetrics
from cxrmax.leaderboard.progression import classify_progression

NAN = np.nan


def _random_labels(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.choice([1.0, 0.0, -1.0, NAN], size=(n, len(OBSERVATIONS)), p=[0.25, 0.3, 0.1, 0.35]).astype(
        np.float32
    )


def test_hand_computed_f1_and_policies():
    # One observation, five studies. Reference: 1, -1, 0, blank, 1. Prediction: 1, 1, -1, 0, blank.
    ref = np.array([[1], [-1], [0], [NAN], [1]], dtype=np.float32)
    pred = np.array([[1], [1], [-1], [0], [NAN]], dtype=np.float32)
    # positive: ref 1,1,0,0,1 pred 1,1,1,0,0 -> tp 2, fp 1, fn 1 -> F1 = 4/6
    stats = metrics.confusion_stats(ref, pred, "positive").sum(0)
    assert stats.tolist() == [[2, 1, 1, 1]]
    assert metrics.f1_from_counts(2, 1, 1) == pytest.approx(4 / 6)
    # negative: ref 1,0,0,0,1 pred 1,1,0,0,0 -> tp 1, fp 1, fn 1, tn 2
    assert metrics.confusion_stats(ref, pred, "negative").sum(0).tolist() == [[1, 1, 1, 2]]
    # ignore: rows 2 and 3 dropped (uncertain ref, uncertain pred) -> ref 1,0,1 pred 1,0,0
    assert metrics.confusion_stats(ref, pred, "ignore").sum(0).tolist() == [[1, 0, 1, 1]]
    with pytest.raises(ValueError, match="uncertain policy"):
        metrics.confusion_stats(ref, pred, "maybe")


def test_micro_macro_against_sklearn():
    from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score

    rng = np.random.default_rng(3)
    ref = _random_labels(rng, 500)
    pred = np.where(rng.random(ref.shape) < 0.7, ref, _random_labels(rng, 500))
    for policy, keep_uncertain_as in (("positive", 1), ("negative", 0)):
        result = metrics.score_labels(ref, pred, policy, n_boot=0)
        y_true = np.where(ref == -1, keep_uncertain_as, np.nan_to_num(ref, nan=0)).astype(int)
        y_pred = np.where(pred == -1, keep_uncertain_as, np.nan_to_num(pred, nan=0)).astype(int)
        assert result.headline["micro_f1_14"] == pytest.approx(f1_score(y_true, y_pred, average="micro"))
        assert result.headline["macro_f1_14"] == pytest.approx(
            f1_score(y_true, y_pred, average="macro", zero_division=0)
        )
        comp = [OBSERVATIONS.index(o) for o in COMPETITION_LABELS]
        assert result.headline["micro_f1_5"] == pytest.approx(
            f1_score(y_true[:, comp], y_pred[:, comp], average="micro")
        )
        assert result.headline["macro_f1_5"] == pytest.approx(
            f1_score(y_true[:, comp], y_pred[:, comp], average="macro")
        )
        for j, row in enumerate(result.per_observation):
            assert row["observation"] == OBSERVATIONS[j]
            assert row["accuracy"] == pytest.approx(accuracy_score(y_true[:, j], y_pred[:, j]))
            assert row["precision"] == pytest.approx(
                precision_score(y_true[:, j], y_pred[:, j], zero_division=0)
            )
            assert row["recall"] == pytest.approx(recall_score(y_true[:, j], y_pred[:, j], zero_division=0))
            assert row["f1"] == pytest.approx(f1_score(y_true[:, j], y_pred[:, j], zero_division=0))


def test_ignore_policy_against_sklearn_on_kept_cells():
    from sklearn.metrics import f1_score

    rng = np.random.default_rng(4)
    ref = _random_labels(rng, 300)
    pred = _random_labels(rng, 300)
    result = metrics.score_labels(ref, pred, "ignore", n_boot=0)
    for j, row in enumerate(result.per_observation):
        keep = (ref[:, j] != -1) & (pred[:, j] != -1)
        y_true = np.nan_to_num(ref[keep, j], nan=0).astype(int)
        y_pred = np.nan_to_num(pred[keep, j], nan=0).astype(int)
        assert row["n"] == int(keep.sum())
        assert row["f1"] == pytest.approx(f1_score(y_true, y_pred, zero_division=0))


def test_auroc_matches_sklearn_with_ties_and_probabilities():
    from sklearn.metrics import f1_score, roc_auc_score

    rng = np.random.default_rng(5)
    y = rng.random(400) < 0.3
    scores = np.round(rng.random(400) * 0.5 + 0.4 * y, 2)  # rounded: many ties
    assert metrics.auroc(y, scores) == pytest.approx(roc_auc_score(y, scores))
    assert metrics.auroc(np.ones(5, bool), np.arange(5)) is None
    ref = np.where(rng.random((400, 14)) < 0.3, 1.0, 0.0).astype(np.float32)
    prob = np.clip(ref * 0.4 + rng.random((400, 14)) * 0.6, 0.001, 0.999).astype(np.float32)
    result = metrics.score_labels(ref, prob, "positive", is_score=np.ones(14, bool), n_boot=0)
    for j, row in enumerate(result.per_observation):
        assert row["auroc"] == pytest.approx(roc_auc_score(ref[:, j], prob[:, j]))
        assert row["f1"] == pytest.approx(f1_score(ref[:, j], prob[:, j] >= 0.5))


def test_bootstrap_interval_contains_estimate_and_is_seeded():
    rng = np.random.default_rng(6)
    ref = _random_labels(rng, 800)
    pred = np.where(rng.random(ref.shape) < 0.8, ref, _random_labels(rng, 800))
    a = metrics.score_labels(ref, pred, n_boot=300, seed=1)
    b = metrics.score_labels(ref, pred, n_boot=300, seed=1)
    c = metrics.score_labels(ref, pred, n_boot=300, seed=2)
    assert a.ci == b.ci and a.ci != c.ci
    for name, (low, high) in a.ci.items():
        assert low < a.headline[name] < high
        assert high - low < 0.1
    # The interval of a mean from the same machinery matches the normal approximation.
    values = rng.random(2000)
    stats = np.column_stack([values, np.ones_like(values)])
    ci = metrics.bootstrap_ci(stats, lambda s: {"mean": s[:, 0] / s[:, 1]}, n_boot=2000, seed=0)["mean"]
    half = 1.96 * values.std() / math.sqrt(len(values))
    assert ci[0] == pytest.approx(values.mean() - half, abs=0.004)
    assert ci[1] == pytest.approx(values.mean() + half, abs=0.004)


def _texts(seed: int, n: int) -> tuple[list[str], list[str]]:
    rnd = random.Random(seed)
    words = (
        "the heart size is normal no focal consolidation pleural effusion pneumothorax left right lung base "
        "mild moderate pulmonary edema stable unchanged compared with prior there ET-tube 3.5cm"
    ).split()
    refs = [" ".join(rnd.choices(words, k=rnd.randint(3, 40))) + "." for _ in range(n)]
    cands = []
    for ref in refs:
        tokens = ref.split()
        rnd.shuffle(tokens) if rnd.random() < 0.3 else None
        tokens = tokens[: rnd.randint(1, len(tokens))] + rnd.choices(words, k=rnd.randint(0, 8))
        cands.append(", ".join(tokens) + "!")
    cands[0] = ""
    cands[1] = "Zebra quagga."
    return cands, refs


def test_bleu_matches_sacrebleu_on_the_same_tokens():
    import sacrebleu

    cands, refs = _texts(0, 300)
    ours = textmetrics.corpus_scores(cands, refs)
    tok_c = [" ".join(textmetrics.tokenize(c)) for c in cands]
    tok_r = [" ".join(textmetrics.tokenize(r)) for r in refs]
    for n in range(1, 5):
        bleu = sacrebleu.metrics.BLEU(
            tokenize="none", smooth_method="none", max_ngram_order=n, effective_order=False
        )
        assert ours[f"bleu_{n}"] == pytest.approx(bleu.corpus_score(tok_c, [tok_r]).score / 100, abs=1e-9)


def test_bleu_hand_computed_and_brevity_penalty():
    # candidate "the cat sat" vs reference "the cat sat on the mat": p1 = p2 = p3 = 1, p4 = 0.
    scores = textmetrics.corpus_scores(["the cat sat"], ["the cat sat on the mat"])
    bp = math.exp(1 - 6 / 3)
    assert scores["bleu_1"] == pytest.approx(bp)
    assert scores["bleu_3"] == pytest.approx(bp)
    assert scores["bleu_4"] == 0.0
    assert textmetrics.corpus_scores(["a b c d e"], ["a b c d e"])["bleu_4"] == pytest.approx(1.0)


def test_rouge_l_matches_rouge_score():
    from rouge_score import rouge_scorer

    cands, refs = _texts(1, 300)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    expected = np.mean([scorer.score(r, c)["rougeL"].fmeasure for c, r in zip(cands, refs, strict=True)])
    assert textmetrics.corpus_scores(cands, refs)["rouge_l"] == pytest.approx(expected, abs=1e-12)


def test_lcs_bit_parallel_equals_dynamic_programming():
    rnd = random.Random(2)

    def dp(a, b):
        table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
        for i, x in enumerate(a):
            for j, y in enumerate(b):
                table[i + 1][j + 1] = table[i][j] + 1 if x == y else max(table[i][j + 1], table[i + 1][j])
        return table[-1][-1]

    for _ in range(300):
        a = [rnd.randint(0, 4) for _ in range(rnd.randint(0, 90))]
        b = [rnd.randint(0, 4) for _ in range(rnd.randint(0, 90))]
        assert textmetrics.lcs_length(a, b) == dp(a, b)


def _cider_d_direct(cands: list[str], refs: list[str], sigma: float = 6.0) -> list[float]:
    """CIDEr-D straight from its definition with Counters (single reference per candidate)."""
    docs = [textmetrics.tokenize(r) for r in refs]

    def grams(tokens, n):
        return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))

    df = [Counter() for _ in range(4)]
    for tokens in docs:
        for n in range(1, 5):
            df[n - 1].update(set(grams(tokens, n)))
    log_n = math.log(len(refs))
    out = []
    for cand, ref_tokens in zip(cands, docs, strict=True):
        cand_tokens = textmetrics.tokenize(cand)
        total = 0.0
        for n in range(1, 5):

            def vec(tokens, n=n):
                return {g: c * (log_n - math.log(max(1, df[n - 1][g]))) for g, c in grams(tokens, n).items()}

            vc, vr = vec(cand_tokens), vec(ref_tokens)
            norm_c = math.sqrt(sum(v * v for v in vc.values()))
            norm_r = math.sqrt(sum(v * v for v in vr.values()))
            dot = sum(min(v, vr.get(g, 0.0)) * vr.get(g, 0.0) for g, v in vc.items())
            cos = dot / (norm_c * norm_r) if norm_c and norm_r else 0.0
            total += cos * math.exp(-((len(cand_tokens) - len(ref_tokens)) ** 2) / (2 * sigma**2))
        out.append(10 * total / 4)
    return out


def test_cider_d_matches_its_definition_and_batches_agree():
    cands, refs = _texts(2, 120)
    corpus = textmetrics.ReferenceCorpus(refs)
    whole = corpus.score_batch(np.arange(len(refs)), cands)
    col = textmetrics.STAT_COLUMNS.index("cider_d")
    np.testing.assert_allclose(whole[:, col], _cider_d_direct(cands, refs), rtol=1e-9, atol=1e-12)
    # Scoring in shuffled batches gives the same per-study statistics (streaming path).
    order = np.random.default_rng(0).permutation(len(refs))
    parts = np.zeros_like(whole)
    for chunk in np.array_split(order, 7):
        parts[chunk] = corpus.score_batch(chunk, [cands[i] for i in chunk])
    np.testing.assert_allclose(parts, whole)
    # A candidate identical to its (distinctive) reference scores 10.
    same = textmetrics.ReferenceCorpus(
        ["left pleural effusion", "no pneumothorax seen today", "heart is enlarged"]
    )
    assert same.score_batch(np.array([1]), ["no pneumothorax seen today"])[0, col] == pytest.approx(10.0)


@pytest.mark.parametrize("tiny", [[""], ["effusion"], ["left effusion"], ["", None, "heart"], [None]])
def test_batches_shorter_than_the_highest_ngram_order_score_like_one_big_batch(tiny):
    """A batch with fewer tokens in all than MAX_ORDER (one one-word report) scores each row as it
    would inside a larger batch; so does a corpus whose references are all shorter than MAX_ORDER."""
    refs = ["small left pleural effusion is seen", "heart is enlarged", "no pneumothorax", "clear lungs", "x"]
    for corpus in (textmetrics.ReferenceCorpus(refs), textmetrics.ReferenceCorpus(refs[1:])):
        _check_tiny_batch(corpus, tiny)


def _check_tiny_batch(corpus, tiny):
    rows = np.arange(len(tiny))
    alone = corpus.score_batch(rows, tiny)
    padding = ["the heart size is normal and the lungs are clear"] * 2
    inside = corpus.score_batch(np.concatenate([rows, [0, 1]]), [*tiny, *padding])[: len(tiny)]
    np.testing.assert_allclose(alone, inside)
    assert alone[:, textmetrics.STAT_COLUMNS.index("cand_len")].tolist() == [
        len(textmetrics.tokenize(t)) for t in tiny
    ]


def test_meteor_absence_is_said_not_zeroed():
    if textmetrics.wordnet_available():
        from nltk.translate.meteor_score import meteor_score

        cands, refs = _texts(5, 40)
        scores = textmetrics.meteor_scores(cands, refs)
        expected = [
            meteor_score([textmetrics.tokenize(r)], textmetrics.tokenize(c))
            for c, r in zip(cands, refs, strict=True)
        ]
        np.testing.assert_allclose(scores, expected)  # the caches change speed, not scores
        assert textmetrics.meteor_scores(["the heart is normal"], ["the heart is normal"])[0] > 0.9
    else:
        with pytest.raises(RuntimeError, match="WordNet"):
            textmetrics.meteor_scores(["a"], ["a"])


@pytest.mark.parametrize(
    ("text", "finding", "expected"),
    [
        ("Worsening", None, "worsening"),
        ("improved", None, "improving"),
        ("STABLE.", None, "stable"),
        ("The left pleural effusion has increased in size.", "pleural_effusion", "worsening"),
        ("Interval improvement of the right lower lobe consolidation.", "consolidation", "improving"),
        ("No change in the small left effusion.", "pleural_effusion", "stable"),
        ("Pneumothorax resolved. Edema is worse.", "pneumothorax", "improving"),
        ("Pneumothorax resolved. Edema is worse.", "edema", "worsening"),
        ("I cannot compare these images.", None, None),
        ("", None, None),
    ],
)
def test_progression_answers(text, finding, expected):
    assert classify_progression(text, finding) == expected


def test_rationale_stats_use_drift_definitions():
    from cxrmax.leaderboard.rationale import rationale_stats, rationale_summary

    # Reference claims Edema and Pleural Effusion; rationale claims Edema and Pneumothorax.
    ref = np.full((2, 14), NAN, dtype=np.float32)
    pred = np.full((2, 14), NAN, dtype=np.float32)
    e, pe, ptx = (OBSERVATIONS.index(o) for o in ("Edema", "Pleural Effusion", "Pneumothorax"))
    ref[0, [e, pe]] = 1
    pred[0, [e, ptx]] = 1
    pred[0, pe] = 0
    # Second rationale claims nothing (precision undefined), reference claims Edema as uncertain.
    ref[1, e] = -1
    stats = rationale_stats(pred, ref, ["a", "b"], None, "positive")
    summary = {k: float(v) for k, v in rationale_summary(stats.sum(0)).items()}
    assert summary["precision"] == pytest.approx(0.5)  # only the first defines precision
    assert summary["recall"] == pytest.approx((0.5 + 0.0) / 2)
    assert summary["label_jaccard"] == pytest.approx((1 / 3 + 0.0) / 2)
    assert math.isnan(summary["similarity"])
    # Under "ignore" the uncertain Edema of study 2 is dropped: recall undefined there.
    ignored = {
        k: float(v)
        for k, v in rationale_summary(rationale_stats(pred, ref, ["a", "b"], None, "ignore").sum(0)).items()
    }
    assert ignored["recall"] == pytest.approx(0.5)
    assert ignored["label_jaccard"] == pytest.approx((1 / 3 + 1.0) / 2)


def test_progression_text_silent_on_a_finding_gives_no_answer():
    text = "The effusion is stable. Pneumonia has improved."
    assert classify_progression(text, "pleural_effusion") == "stable"
    assert classify_progression(text, "pneumonia") == "improving"
    assert classify_progression(text, "consolidation") is None
