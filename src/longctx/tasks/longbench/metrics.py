"""LongBench's metrics, reproducing the official `LongBench/metrics.py` (THUDM/LongBench, commit 2e00731f8d0b).

Every metric scores one prediction against one reference in [0, 1]; `score_sample` takes the max over the references,
as the official `eval.py` does. ROUGE-L uses the `rouge` package the official code uses (its numbers depend on that
package's sentence splitting); edit similarity uses `rapidfuzz`, whose `fuzz.ratio` is the indel similarity that
fuzzywuzzy computes with python-Levenshtein, rounded to a whole percent as fuzzywuzzy does.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from typing import Callable, Sequence

from rapidfuzz import fuzz

Metric = Callable[..., float]

# The official lists, byte for byte: Chinese full-width punctuation on top of ASCII's.
_CN_PUNCTUATION = "！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣､、〃》「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟〰〾〿–—‘’‛“”„‟…‧﹏."
_ASCII_PUNCTUATION = set(string.punctuation)
_ALL_PUNCTUATION = set(string.punctuation + _CN_PUNCTUATION)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_NUMBER = re.compile(r"\d+")


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, drop punctuation, then the articles a/an/the, then squeeze whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _ASCII_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def normalize_zh_answer(text: str) -> str:
    """The Chinese normalisation: lower case, drop ASCII and Chinese punctuation, drop all whitespace."""
    return "".join("".join(ch for ch in text.lower() if ch not in _ALL_PUNCTUATION).split())


def _jieba_words(text: str) -> list[str]:
    import jieba  # imported on first Chinese text: it builds its dictionary then (about a second)

    return list(jieba.cut(text, cut_all=False))


def token_f1(prediction: Sequence[str], reference: Sequence[str]) -> float:
    """F1 of the multiset overlap of two token lists (0 when nothing overlaps, empty lists included)."""
    same = sum((Counter(prediction) & Counter(reference)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(prediction), same / len(reference)
    return 2 * precision * recall / (precision + recall)


def qa_f1(prediction: str, reference: str, **_) -> float:
    return token_f1(normalize_answer(prediction).split(), normalize_answer(reference).split())


def qa_f1_zh(prediction: str, reference: str, **_) -> float:
    def words(text: str) -> list[str]:
        return [word for word in map(normalize_zh_answer, _jieba_words(text)) if word]

    return token_f1(words(prediction), words(reference))


def rouge_l(prediction: str, reference: str, **_) -> float:
    """ROUGE-L F of the `rouge` package; 0 where it refuses (an empty prediction), as the official code catches that."""
    from rouge import Rouge

    try:
        return float(Rouge(metrics=["rouge-l"]).get_scores([prediction], [reference], avg=True)["rouge-l"]["f"])
    except Exception:  # the official rouge_score returns 0.0 on any failure of the package; so do we
        return 0.0


def rouge_l_zh(prediction: str, reference: str, **_) -> float:
    return rouge_l(" ".join(_jieba_words(prediction)), " ".join(_jieba_words(reference)))


def classification(prediction: str, reference: str, all_classes: Sequence[str] | None = None, **_) -> float:
    """1 / (classes named) when the reference class is among the class names found in the prediction.

    A found class that is a substring of the reference (and not the reference) is dropped. The official loop removes
    from the list it iterates over, which skips the element after each removal; that is kept so scores match exactly.
    """
    if not all_classes:
        raise ValueError("classification needs all_classes (the dataset's list of class names)")
    matches = [name for name in all_classes if name in prediction]
    for name in matches:  # mutating while iterating: the official behaviour, see the docstring
        if name in reference and name != reference:
            matches.remove(name)
    return 1.0 / len(matches) if reference in matches else 0.0


def _share_of_numbers_equal(prediction: str, target: str) -> float:
    numbers = _NUMBER.findall(prediction)
    return sum(number == target for number in numbers) / len(numbers) if numbers else 0.0


def count(prediction: str, reference: str, **_) -> float:
    """The share of the numbers in the prediction that equal the reference count."""
    return _share_of_numbers_equal(prediction, str(reference))


def retrieval(prediction: str, reference: str, **_) -> float:
    """The share of the numbers in the prediction that equal N of the reference "Paragraph N"."""
    return _share_of_numbers_equal(prediction, _paragraph_number(r"Paragraph (\d+)", reference))


def retrieval_zh(prediction: str, reference: str, **_) -> float:
    """As `retrieval`, for references "段落N"."""
    return _share_of_numbers_equal(prediction, _paragraph_number(r"段落(\d+)", reference))


def _paragraph_number(pattern: str, reference: str) -> str:
    match = re.search(pattern, reference)
    if match is None:
        raise ValueError(f"retrieval reference {reference!r} does not name a paragraph ({pattern})")
    return match.group(1)


def code_sim(prediction: str, reference: str, **_) -> float:
    """Edit similarity of the first line of the prediction that is code (no `, # or //) with the reference line."""
    line = next((line for line in prediction.lstrip("\n").split("\n") if not any(mark in line for mark in ("`", "#", "//"))), "")
    return round(fuzz.ratio(line, reference)) / 100


METRICS: dict[str, Metric] = {
    "qa_f1": qa_f1,
    "qa_f1_zh": qa_f1_zh,
    "rouge": rouge_l,
    "rouge_zh": rouge_l_zh,
    "classification": classification,
    "retrieval": retrieval,
    "retrieval_zh": retrieval_zh,
    "count": count,
    "code_sim": code_sim,
}


def first_line(prediction: str) -> str:
    """The post-processing of the few-shot datasets: the first line after leading newlines."""
    return prediction.lstrip("\n").split("\n")[0]


def score_sample(
    metric: str, prediction: str, references: Sequence[str], all_classes: Sequence[str] | None = None,
    only_first_line: bool = False,
) -> float:
    """The official per-sample score: post-process, then the best score over the references (in [0, 1])."""
    if only_first_line:
        prediction = first_line(prediction)
    function = METRICS[metric]
    return max((function(prediction, reference, all_classes=all_classes) for reference in references), default=0.0)
