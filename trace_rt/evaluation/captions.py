"""Caption scoring: CIDEr-D (our implementation), the PTB tokenizer and METEOR (Java).

The original scores captions with the coco-caption code (``pycocoevalcap``): captions are
tokenized by Stanford's PTBTokenizer (Java, lower-cased, punctuation tokens removed),
CIDEr-D is computed in Python and METEOR 1.5 runs as a Java subprocess.

* :func:`cider_d` reproduces ``pycocoevalcap``'s ``CiderScorer`` (CIDEr-D): n-grams 1..4,
  tf-idf with document frequencies taken from the references *passed in the same call*
  and ``log(#references sets)`` as the idf numerator, clipped cosine similarity, a
  Gaussian length penalty (sigma 6) on the difference of the two captions' *bigram*
  counts (the scorer's ``length``), mean over n, over references, times 10.
* :class:`JavaScorers` runs the PTBTokenizer and METEOR jars shipped in ``pycocoevalcap``
  (the ``eval`` extra) when a Java runtime is on PATH. Without them METEOR (and SODA_c,
  which is built on it) are *unavailable*, never 0, and captions are tokenized by
  :func:`simple_ptb_tokenize`, a Python approximation of the PTB rules (CIDEr is then
  marked approximate).
"""

from __future__ import annotations

import math
import re
import shutil
from collections import Counter
from collections.abc import Mapping, Sequence

# pycocoevalcap's tokenizer drops these tokens after tokenizing.
PUNCTUATION = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":",
               "-", "--", "...", ";"}  # fmt: skip


def _ngrams(words: Sequence[str], n: int = 4) -> Counter:
    c: Counter = Counter()
    for k in range(1, n + 1):
        for i in range(len(words) - k + 1):
            c[tuple(words[i : i + k])] += 1
    return c


def cider_d(
    refs: Mapping[str, Sequence[str]], hyps: Mapping[str, str], sigma: float = 6.0
) -> tuple[float, dict[str, float]]:
    """CIDEr-D of tokenized *hyps* (key -> caption) against *refs* (key -> captions).

    Returns the mean and the per-key scores (``Cider().compute_score``'s pair).
    """
    if set(refs) != set(hyps):
        raise ValueError("references and hypotheses must have the same keys")
    keys = list(hyps)
    if not keys:
        return 0.0, {}
    crefs = {k: [_ngrams(r.split()) for r in refs[k]] for k in keys}
    df: Counter = Counter()
    for k in keys:
        df.update({g for c in crefs[k] for g in c})
    ref_len = math.log(len(keys))

    def vec(counts: Counter) -> tuple[list[dict], list[float], int]:
        v: list[dict] = [{} for _ in range(4)]
        norm = [0.0] * 4
        length = 0
        for g, tf in counts.items():
            n = len(g) - 1
            w = tf * (ref_len - math.log(max(1.0, df.get(g, 0.0))))
            v[n][g] = w
            norm[n] += w * w
            if n == 1:  # the scorer's "length" counts bigrams
                length += tf
        return v, [math.sqrt(x) for x in norm], length

    scores = {}
    for k in keys:
        vh, nh, lh = vec(_ngrams(hyps[k].split()))
        total = 0.0
        for cr in crefs[k]:
            vr, nr, lr = vec(cr)
            penalty = math.exp(-((lh - lr) ** 2) / (2 * sigma**2))
            for n in range(4):
                val = sum(min(w, vr[n].get(g, 0.0)) * vr[n].get(g, 0.0) for g, w in vh[n].items())
                if nh[n] != 0 and nr[n] != 0:
                    val /= nh[n] * nr[n]
                total += val * penalty / 4
        scores[k] = total / len(crefs[k]) * 10.0 if crefs[k] else 0.0
    return sum(scores.values()) / len(scores), scores


_TOKEN_RE = re.compile(r"n't|'[a-z]+|\.\.\.|--|-[lr][rc]b-|[a-z0-9]+(?:[.,][0-9]+)*|\S")
_BRACKETS = {"(": " -lrb- ", ")": " -rrb- ", "{": " -lcb- ", "}": " -rcb- "}


def simple_ptb_tokenize(text: str) -> str:
    """A Python approximation of the PTB tokenization pycocoevalcap runs in Java
    (``PTBTokenizer -preserveLines -lowerCase``, then :data:`PUNCTUATION` removed):
    lower-case, split off punctuation and clitics (``doesn't`` -> ``does n't``), brackets
    as ``-lrb-``/``-rrb-`` (kept: the removal list spells them in upper case)."""
    text = text.replace("\n", " ").lower()
    for b, word in _BRACKETS.items():
        text = text.replace(b, word)
    text = re.sub(r"(\w)(n't)\b", r"\1 \2", text)
    text = re.sub(r"(\w)('s|'re|'ve|'ll|'m|'d)\b", r"\1 \2", text)
    toks = [t for part in text.split() for t in _TOKEN_RE.findall(part)]
    return " ".join(t for t in toks if t not in PUNCTUATION)


def java_status() -> tuple[bool, str]:
    """Whether the Java scorers can run here, and if not, why."""
    if shutil.which("java") is None:
        return False, "no Java runtime on PATH (apt-get install -y default-jre-headless)"
    try:
        import pycocoevalcap.meteor.meteor
        import pycocoevalcap.tokenizer.ptbtokenizer  # noqa: F401
    except ImportError:
        return False, "pycocoevalcap is not installed (pip install 'trace-rt[eval]')"
    return True, ""


class JavaScorers:
    """pycocoevalcap's PTBTokenizer and METEOR 1.5 (one METEOR subprocess, reused).

    Raises:
        RuntimeError: Java or pycocoevalcap is missing (:func:`java_status`'s reason).
    """

    def __init__(self) -> None:
        ok, why = java_status()
        if not ok:
            raise RuntimeError(why)
        from pycocoevalcap.meteor.meteor import Meteor
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        self._tokenizer = PTBTokenizer()
        self._meteor = Meteor()

    def tokenize(self, texts: Sequence[str]) -> list[str]:
        if not texts:
            return []
        out = self._tokenizer.tokenize({i: [{"caption": t}] for i, t in enumerate(texts)})
        return [out[i][0] for i in range(len(texts))]

    def meteor(
        self, refs: Mapping[str, Sequence[str]], hyps: Mapping[str, str]
    ) -> tuple[float, dict[str, float]]:
        """METEOR of *hyps* against *refs* (tokenized): the corpus score and per key."""
        keys = list(hyps)
        score, per = self._meteor.compute_score(
            {k: list(refs[k]) for k in keys}, {k: [hyps[k]] for k in keys}
        )
        return float(score), {k: float(s) for k, s in zip(keys, per, strict=True)}

    def close(self) -> None:
        m = self._meteor
        with m.lock:
            for stream in (m.meteor_p.stdin, m.meteor_p.stdout):
                stream.close()
            m.meteor_p.kill()
            m.meteor_p.wait()


class PythonTokenizer:
    """The fallback when Java is unavailable (see the module docstring)."""

    def tokenize(self, texts: Sequence[str]) -> list[str]:
        return [simple_ptb_tokenize(t) for t in texts]
