"""Report-generation metrics written for cxrmax: BLEU-1..4, ROUGE-L, CIDEr-D (and METEOR through nltk
when WordNet data is installed), vectorised over the whole batch with numpy.

Tokenisation (one for every metric): lower-case, then maximal runs of ``[a-z0-9]``; punctuation and
other characters separate tokens and are dropped. This is rouge-score's default tokenizer (no
stemming), so ROUGE-L equals ``rouge_score.rouge_scorer.RougeScorer(["rougeL"])`` F-measure; BLEU equals
sacrebleu's corpus BLEU run on the same tokens (``tokenize="none"``, ``smooth_method="none"``,
``max_ngram_order=n``). sacrebleu's default 13a tokenizer keeps punctuation as tokens and its scores
differ from ours accordingly; sacrebleu reports 0-100, we report 0-1.

Definitions (single reference per study):
- BLEU-n: corpus-level, geometric mean of clipped 1..n-gram precisions times the brevity penalty
  exp(1 - r/c) when the candidate corpus is shorter than the reference corpus; no smoothing.
- ROUGE-L: per study F1 of LCS precision (LCS / candidate length) and recall (LCS / reference
  length); the corpus figure is the mean over studies. LCS uses the bit-parallel algorithm.
- CIDEr-D: per study, for n = 1..4, tf-idf vectors with document frequencies from the reference
  corpus, cosine with the candidate clipped to the reference's tf-idf, times the Gaussian length
  penalty exp(-(l_c - l_r)^2 / (2 * 6^2)); mean over n, times 10; corpus figure = mean over studies.
  Lengths are unigram counts (pycocoevalcap's implementation counts bigrams there; ours follows the
  published definition). Document frequencies come from every reference of the task (the whole
  reference set of its split and section, `ReferenceCorpus`), not only from the studies a submission
  covers: pycocoevalcap takes them from the references it is given, which is the same set when the
  submission covers the task, as ranked entries do.
- rexrank_bleu_2 (in the result's ``extra``, not the headline): ReXrank's BLEU-2 (CXR-Report-Metric's ``add_bleu_col``, fast_bleu): its own
  tokenisation (lower-case, ``.`` split off as a token, split on single spaces, so other punctuation
  stays attached to words), sentence-level BLEU with weights (1/2, 1/2), no smoothing, averaged over
  studies. Equal to ``nltk.translate.bleu_score.sentence_bleu(weights=(0.5, 0.5))`` on those tokens.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os
import re
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MAX_ORDER = 4
CIDER_SIGMA = 6.0
_TOKEN = re.compile(r"[a-z0-9]+")

#: Column layout of the per-study statistics returned by `ReferenceCorpus.score_batch`.
STAT_COLUMNS = (
    [f"match_{n}" for n in range(1, MAX_ORDER + 1)]
    + [f"total_{n}" for n in range(1, MAX_ORDER + 1)]
    + ["cand_len", "ref_len", "rouge_l", "cider_d", "bleu_2_rexrank", "count"]
)
_COL = {name: i for i, name in enumerate(STAT_COLUMNS)}


def tokenize(text: str | None) -> list[str]:
    """The tokenizer shared by every text metric (rouge-score's default, without stemming)."""
    if not text:
        return []
    return _TOKEN.findall(text.lower())


def rexrank_tokenize(text: str | None) -> list[str]:
    """ReXrank's tokenisation (CXR-Report-Metric ``prep_reports``): lower-case, a space before every
    ``.``, split on single spaces, empty strings dropped."""
    if text is None:
        return []
    return [t for t in str(text).lower().replace(".", " .").split(" ") if t != ""]


def _bigram_counts(tokens: list[str]) -> tuple[Counter, Counter]:
    return Counter(tokens), Counter(zip(tokens, tokens[1:], strict=False))  # neighbour pairs


def rexrank_bleu_2(candidate: list[str], reference: tuple[Counter, Counter, int]) -> float:
    """Sentence BLEU-2 of ReXrank tokens against one reference's (unigram, bigram counts, length):
    brevity penalty times the geometric mean of the clipped 1- and 2-gram precisions, 0 when either
    has no match (no smoothing, as fast_bleu and nltk's default)."""
    ref_uni, ref_bi, ref_len = reference
    c = len(candidate)
    if c == 0:
        return 0.0
    uni, bi = _bigram_counts(candidate)
    match_1 = sum(min(n, ref_uni[g]) for g, n in uni.items())
    match_2 = sum(min(n, ref_bi[g]) for g, n in bi.items())
    if match_1 == 0 or match_2 == 0:
        return 0.0
    log_p = 0.5 * math.log(match_1 / c) + 0.5 * math.log(match_2 / (c - 1))
    brevity = 1.0 if c > ref_len else math.exp(1 - ref_len / c)
    return brevity * math.exp(log_p)


def lcs_length(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common subsequence, bit-parallel (one pass over ``b``, O(len(b)) big-int
    operations on a len(a)-bit vector)."""
    if not a or not b:
        return 0
    masks: dict[int, int] = {}
    for i, token in enumerate(a):
        masks[token] = masks.get(token, 0) | (1 << i)
    full = (1 << len(a)) - 1
    v = full
    for token in b:
        u = v & masks.get(token, 0)
        v = ((v + u) | (v - u)) & full
    return len(a) - v.bit_count()


def _unique_pairs(prev: np.ndarray, tok: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Map (prev id, token id) pairs to dense ids; returns (sorted packed keys, ids per pair)."""
    packed = prev.astype(np.int64) * width + tok
    keys, inverse = np.unique(packed, return_inverse=True)
    return keys, inverse.astype(np.int64)


@dataclass
class _Order:
    keys: np.ndarray  # sorted packed (prev gram id, token id) keys of this order's reference grams
    n_grams: int
    idf: np.ndarray  # per gram id
    ref_key: np.ndarray  # sorted row * n_grams + gram of reference unique grams
    ref_count: np.ndarray
    ref_weight: np.ndarray  # tf-idf of the reference unique grams
    ref_norm: np.ndarray  # per reference row


def _row_index(lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row index and position within the row of every token of a flat concatenation."""
    rows = np.repeat(np.arange(len(lengths)), lengths)
    starts = np.cumsum(lengths) - lengths
    pos = np.arange(int(lengths.sum())) - np.repeat(starts, lengths)
    return rows, pos


class ReferenceCorpus:
    """Reference reports prepared once (tokens, n-gram ids, document frequencies, tf-idf norms); then
    candidates are scored batch by batch against the reference at given row indices, so memory does
    not grow with the submission."""

    def __init__(self, references: Sequence[str | None]):
        self.size = len(references)
        self._references = references
        self._rexrank: list[tuple[Counter, Counter, int] | None] = [None] * self.size
        tokens = [tokenize(t) for t in references]
        self.vocab: dict[str, int] = {}
        flat: list[int] = []
        for toks in tokens:
            for t in toks:
                flat.append(self.vocab.setdefault(t, len(self.vocab)))
        self.width = len(self.vocab) + 1  # room for the "unknown" token id
        self.ids = np.asarray(flat, dtype=np.int64)
        self.lengths = np.asarray([len(t) for t in tokens], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.lengths)])
        rows, pos = _row_index(self.lengths)
        log_n = np.log(max(self.size, 1))
        self.orders: list[_Order] = []
        grams = self.ids.copy()
        for n in range(1, MAX_ORDER + 1):
            valid = pos + n <= self.lengths[rows]
            if n == 1:
                keys, gram_ids = _unique_pairs(np.zeros(len(grams), np.int64), grams, self.width)
                grams = gram_ids
            else:
                nxt = np.full(len(grams), -1, dtype=np.int64)
                idx = np.nonzero(valid)[0]
                keys, gram_ids = _unique_pairs(grams[idx], self.ids[idx + n - 1], self.width)
                nxt[idx] = gram_ids
                grams = nxt
            n_grams = len(keys)
            sel = np.nonzero(valid)[0]
            row_keys, counts = np.unique(rows[sel] * n_grams + grams[sel], return_counts=True)
            gram_of = row_keys % n_grams
            df = np.bincount(gram_of, minlength=n_grams)
            idf = log_n - np.log(np.maximum(df, 1))
            weight = counts * idf[gram_of]
            norm = np.sqrt(np.bincount(row_keys // n_grams, weights=weight**2, minlength=self.size))
            self.orders.append(_Order(keys, n_grams, idf, row_keys, counts, weight, norm))
        self._log_n = log_n

    def rexrank_reference(self, row: int) -> tuple[Counter, Counter, int]:
        """ReXrank unigram and bigram counts and length of one reference (computed once, on demand)."""
        cached = self._rexrank[row]
        if cached is None:
            tokens = rexrank_tokenize(self._references[row])
            cached = (*_bigram_counts(tokens), len(tokens))
            self._rexrank[row] = cached
        return cached

    def tokens(self, row: int) -> np.ndarray:
        """Token ids of one reference."""
        return self.ids[self.offsets[row] : self.offsets[row + 1]]

    def score_batch(self, ref_rows: np.ndarray, candidates: Sequence[str | None]) -> np.ndarray:
        """Per-candidate statistics (len(candidates), len(STAT_COLUMNS)) against ``references[ref_rows]``."""
        ref_rows = np.asarray(ref_rows, dtype=np.int64)
        m = len(candidates)
        out = np.zeros((m, len(STAT_COLUMNS)), dtype=np.float64)
        if m == 0:
            return out
        unknown = self.width - 1
        cand_tokens = [tokenize(t) for t in candidates]
        lengths = np.asarray([len(t) for t in cand_tokens], dtype=np.int64)
        ids = np.asarray([self.vocab.get(t, unknown) for toks in cand_tokens for t in toks], dtype=np.int64)
        # Unknown tokens must stay distinct from each other for the tf-idf norms: give them local ids.
        unk = ids == unknown
        if unk.any():
            words = np.asarray([t for toks in cand_tokens for t in toks], dtype=object)[unk]
            _, local = np.unique(words.astype(str), return_inverse=True)
            ids[unk] = self.width + local
        width = int(ids.max()) + 1 if ids.size else self.width
        width = max(width, self.width)
        rows, pos = _row_index(lengths)
        ref_len = self.lengths[ref_rows]
        out[:, _COL["cand_len"]] = lengths
        out[:, _COL["ref_len"]] = ref_len
        out[:, _COL["count"]] = 1.0
        length_penalty = np.exp(-((lengths - ref_len) ** 2) / (2 * CIDER_SIGMA**2))
        cider = np.zeros(m)
        grams = ids.copy()
        for n, order in enumerate(self.orders, start=1):
            valid = pos + n <= lengths[rows]
            prev = np.zeros(len(ids), np.int64) if n == 1 else grams
            # The token n-1 places ahead (zero past the end); as long as ids even when ids is shorter than n.
            tok = ids if n == 1 else np.concatenate([ids, np.zeros(n - 1, np.int64)])[n - 1 :]
            packed = prev * width + tok
            # Known grams: the packed key exists in the reference table of this order (prev < ref ids
            # and token < self.width guarantee the packing matches the reference packing).
            known = valid & (prev < (1 if n == 1 else self.orders[n - 2].n_grams)) & (tok < self.width)
            ref_packed = prev * self.width + tok
            where = np.searchsorted(order.keys, ref_packed)
            where = np.minimum(where, max(len(order.keys) - 1, 0))
            if len(order.keys):
                known &= order.keys[where] == ref_packed
            else:
                known[:] = False
            new = np.full(len(ids), -1, dtype=np.int64)
            new[known] = where[known]
            fresh = valid & ~known
            if fresh.any():
                _, local = np.unique(packed[fresh], return_inverse=True)
                new[fresh] = order.n_grams + local
            grams = new
            sel = np.nonzero(valid)[0]
            total = int(order.n_grams + (local.max() + 1 if fresh.any() else 0))
            cand_keys, cand_counts = np.unique(rows[sel] * total + grams[sel], return_counts=True)
            c_row = cand_keys // total
            c_gram = cand_keys % total
            out[:, _COL[f"total_{n}"]] = np.bincount(c_row, weights=cand_counts, minlength=m)
            if order.n_grams:
                idf = np.where(
                    c_gram < order.n_grams, order.idf[np.minimum(c_gram, order.n_grams - 1)], self._log_n
                )
            else:  # no reference has n tokens (very short references): every gram is unseen
                idf = np.full(len(c_gram), self._log_n)
            c_weight = cand_counts * idf
            c_norm = np.sqrt(np.bincount(c_row, weights=c_weight**2, minlength=m))
            # Look each candidate gram up in its own reference row.
            in_ref = c_gram < order.n_grams
            query = ref_rows[c_row] * order.n_grams + np.minimum(c_gram, order.n_grams - 1)
            if len(order.ref_key):
                hit_at = np.minimum(np.searchsorted(order.ref_key, query), len(order.ref_key) - 1)
                hit = in_ref & (order.ref_key[hit_at] == query)
                r_count = np.where(hit, order.ref_count[hit_at], 0)
                r_weight = np.where(hit, order.ref_weight[hit_at], 0.0)
            else:  # no reference has an n-gram of this order
                r_count, r_weight = np.zeros(len(query), np.int64), np.zeros(len(query))
            out[:, _COL[f"match_{n}"]] = np.bincount(
                c_row, weights=np.minimum(cand_counts, r_count), minlength=m
            )
            dot = np.bincount(c_row, weights=np.minimum(c_weight, r_weight) * r_weight, minlength=m)
            denom = c_norm * order.ref_norm[ref_rows]
            cider += np.divide(dot, denom, out=np.zeros(m), where=denom > 0) * length_penalty
        out[:, _COL["cider_d"]] = 10.0 * cider / MAX_ORDER
        # ROUGE-L, bit-parallel LCS per pair.
        starts = np.concatenate([[0], np.cumsum(lengths)])
        rouge = out[:, _COL["rouge_l"]]
        rexrank = out[:, _COL["bleu_2_rexrank"]]
        id_list = ids.tolist()
        for i in range(m):
            reference = self.rexrank_reference(int(ref_rows[i]))
            rexrank[i] = rexrank_bleu_2(rexrank_tokenize(candidates[i]), reference)
            cand = id_list[starts[i] : starts[i + 1]]
            ref = self.tokens(int(ref_rows[i])).tolist()
            lcs = lcs_length(ref, cand)
            if lcs:
                p, r = lcs / len(cand), lcs / len(ref)
                rouge[i] = 2 * p * r / (p + r)
        return out


def text_summary(sums: np.ndarray) -> dict[str, np.ndarray]:
    """Corpus BLEU-1..4, mean ROUGE-L and mean CIDEr-D from summed per-study statistics (..., columns).
    Vectorised over leading axes (bootstrap replicates)."""
    sums = np.asarray(sums, dtype=np.float64)
    out: dict[str, np.ndarray] = {}
    c, r = sums[..., _COL["cand_len"]], sums[..., _COL["ref_len"]]
    bp = np.where(c >= r, 1.0, np.exp(1 - np.divide(r, c, out=np.full_like(c, np.inf), where=c > 0)))
    log_p = np.zeros_like(c)
    zero = np.zeros(c.shape, dtype=bool)
    for n in range(1, MAX_ORDER + 1):
        match, total = sums[..., _COL[f"match_{n}"]], sums[..., _COL[f"total_{n}"]]
        zero |= match <= 0
        log_p = log_p + np.log(
            np.divide(match, total, out=np.ones_like(match), where=(total > 0) & (match > 0))
        )
        out[f"bleu_{n}"] = np.where(zero, 0.0, bp * np.exp(log_p / n))
    count = sums[..., _COL["count"]]
    out["rouge_l"] = np.divide(sums[..., _COL["rouge_l"]], count, out=np.zeros_like(count), where=count > 0)
    out["cider_d"] = np.divide(sums[..., _COL["cider_d"]], count, out=np.zeros_like(count), where=count > 0)
    return out


def rexrank_bleu_2_mean(sums: np.ndarray) -> float:
    """ReXrank's BLEU-2 (mean over studies) from summed per-study statistics. Kept out of
    `text_summary`, the headline: its tokenisation differs from every other metric here."""
    count = float(sums[_COL["count"]])
    return float(sums[_COL["bleu_2_rexrank"]]) / count if count else 0.0


def _nltk_data_dirs() -> list[Path]:
    """nltk's data search path (NLTK_DATA, then its defaults), computed without importing nltk: the
    import pulls in scipy.stats and costs seconds."""
    dirs = [Path(p) for p in os.environ.get("NLTK_DATA", "").split(os.pathsep) if p]
    dirs.append(Path.home() / "nltk_data")
    for prefix in (sys.prefix, "/usr/share", "/usr/local/share", "/usr/lib", "/usr/local/lib"):
        dirs.append(Path(prefix) / "nltk_data")
    dirs += [Path(sys.prefix) / "share" / "nltk_data", Path(sys.prefix) / "lib" / "nltk_data"]
    return dirs


def wordnet_available() -> bool:
    """True when nltk is installed and its WordNet data is on nltk's search path (METEOR needs both)."""
    if importlib.util.find_spec("nltk") is None:
        return False
    for base in _nltk_data_dirs():
        corpora = base / "corpora"
        if (corpora / "wordnet").is_dir() or (corpora / "wordnet.zip").is_file():
            return True
    return False


METEOR_MISSING = (
    "METEOR not computed: nltk's WordNet data is not installed (nltk.data.find('corpora/wordnet') "
    "failed). Install it (python -m nltk.downloader wordnet, or Debian's wordnet files under "
    "$NLTK_DATA/corpora/wordnet) to get METEOR."
)


def meteor_scores(candidates: Sequence[str | None], references: Sequence[str | None]) -> np.ndarray:
    """Per-pair METEOR with nltk (same tokens as the other metrics). Raises RuntimeError with
    `METEOR_MISSING` when WordNet is absent: never a silent zero."""
    if not wordnet_available():
        raise RuntimeError(METEOR_MISSING)
    from nltk.corpus import wordnet
    from nltk.stem.porter import PorterStemmer
    from nltk.translate.meteor_score import meteor_score

    # Same scores as nltk's defaults; reports repeat a small vocabulary, so caching the stemmer and the
    # WordNet synset lookups (the slow parts) per word speeds METEOR up several-fold.
    stemmer, lexicon = _CachedStemmer(PorterStemmer()), _CachedWordNet(wordnet)
    return np.asarray(
        [
            meteor_score([tokenize(r)], tokenize(c), stemmer=stemmer, wordnet=lexicon)
            for c, r in zip(candidates, references, strict=True)
        ],
        dtype=np.float64,
    )


class _CachedStemmer:
    def __init__(self, stemmer: object):
        self._stem = functools.lru_cache(maxsize=1 << 16)(stemmer.stem)  # type: ignore[attr-defined]

    def stem(self, word: str) -> str:
        return self._stem(word)


class _CachedWordNet:
    def __init__(self, wordnet: object):
        self._wordnet = wordnet
        self._synsets = functools.lru_cache(maxsize=1 << 16)(lambda word: tuple(wordnet.synsets(word)))  # type: ignore[attr-defined]

    def synsets(self, word: str) -> tuple:
        return self._synsets(word)

    def __getattr__(self, name: str) -> object:
        return getattr(self._wordnet, name)


def corpus_scores(candidates: Sequence[str | None], references: Sequence[str | None]) -> dict[str, float]:
    """Convenience: all weightless metrics for aligned candidate/reference lists (in memory)."""
    corpus = ReferenceCorpus(references)
    stats = corpus.score_batch(np.arange(len(references)), candidates)
    return {k: float(v) for k, v in text_summary(stats.sum(0)).items()}
