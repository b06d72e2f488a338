"""Exact match after whitespace normalisation, as an Evaluate metric loaded by path."""

import datasets
import evaluate


def _normalise(text: str, ignore_case: bool) -> str:
    text = " ".join(text.split())
    return text.lower() if ignore_case else text


class ExactMatch(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description="Share (0-1) of predictions equal to their reference after collapsing whitespace.",
            citation="",
            inputs_description="predictions: list of str; references: list of str; ignore_case: bool.",
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references, ignore_case=False):
        pairs = list(zip(predictions, references, strict=True))
        hits = sum(_normalise(p, ignore_case) == _normalise(r, ignore_case) for p, r in pairs)
        return {"exactMatch": hits / len(pairs) if pairs else 0.0}
