"""Corpus BLEU (Papineni et al. 2002) as sacreBLEU computes it by default, so that scores compare with published ones:
the 13a tokenisation of mteval-v13a.pl, n-grams up to 4, one reference per sentence, counts summed over the corpus
before the precisions are taken, the brevity penalty on corpus lengths, and sacreBLEU's "exp" smoothing of an
n-gram order with no match (its precision becomes 1 / (2^k * total) for the k-th such order).

    BLEU = BP * exp(mean_n log p_n),   p_n = clipped matching n-grams / hypothesis n-grams,
    BP = 1 if c > r else exp(1 - r / c),  c, r = hypothesis and reference lengths in tokens.
"""

from __future__ import annotations

import math
import re
from collections import Counter

MAX_ORDER = 4

# mteval-v13a's language-independent rules, in order: split off punctuation and symbols; then periods and commas
# unless inside a number; then a dash after a digit.
_13A_RULES = (
    (re.compile(r"([\{-\~\[-\` -\&\(-\+\:-\@\/])"), r" \1 "),
    (re.compile(r"([^0-9])([\.,])"), r"\1 \2 "),
    (re.compile(r"([\.,])([^0-9])"), r" \1 \2"),
    (re.compile(r"([0-9])(-)"), r"\1 \2 "),
)


def tokenize_13a(line: str) -> list[str]:
    line = line.replace("<skipped>", "").replace("-\n", "").replace("\n", " ")
    if "&" in line:
        line = line.replace("&quot;", '"').replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">")
    line = f" {line} "
    for pattern, replacement in _13A_RULES:
        line = pattern.sub(replacement, line)
    return line.split()


def _ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def corpus_bleu(hypotheses: list[str], references: list[str]) -> dict:
    """{"score": BLEU in [0, 100], "precisions": [p_1..p_4] in %, "brevity_penalty", "length_ratio" (c / r),
    "hyp_len", "ref_len"} for hypotheses[i] translated against references[i]."""
    if len(hypotheses) != len(references):
        raise ValueError(f"corpus_bleu: {len(hypotheses)} hypotheses but {len(references)} references")
    correct, total = [0] * MAX_ORDER, [0] * MAX_ORDER
    hyp_len = ref_len = 0
    for hypothesis, reference in zip(hypotheses, references):
        hyp, ref = tokenize_13a(hypothesis), tokenize_13a(reference)
        hyp_len, ref_len = hyp_len + len(hyp), ref_len + len(ref)
        for n in range(1, MAX_ORDER + 1):
            hyp_ngrams, ref_ngrams = _ngrams(hyp, n), _ngrams(ref, n)
            correct[n - 1] += sum(min(count, ref_ngrams[gram]) for gram, count in hyp_ngrams.items())
            total[n - 1] += max(0, len(hyp) - n + 1)
    precisions, halvings = [0.0] * MAX_ORDER, 1.0
    for n in range(MAX_ORDER):
        if total[n] == 0:
            break  # no n-grams this long at all: the score is 0 (the log below sees precision 0)
        if correct[n] == 0:
            halvings *= 2
            precisions[n] = 100.0 / (halvings * total[n])
        else:
            precisions[n] = 100.0 * correct[n] / total[n]
    if hyp_len == 0:
        brevity = 0.0
    else:
        brevity = 1.0 if hyp_len >= ref_len else math.exp(1.0 - ref_len / hyp_len)
    log_mean = sum(math.log(p / 100.0) if p > 0 else -math.inf for p in precisions) / MAX_ORDER
    score = 100.0 * brevity * math.exp(log_mean) if log_mean > -math.inf else 0.0
    return {"score": score, "precisions": precisions, "brevity_penalty": brevity,
            "length_ratio": hyp_len / ref_len if ref_len else 0.0, "hyp_len": hyp_len, "ref_len": ref_len}
