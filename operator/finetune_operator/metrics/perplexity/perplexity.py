"""Perplexity from per-sequence negative log-likelihood sums and token counts, as an Evaluate metric.

Evaluate's Hub perplexity loads a model by id itself, which cannot score a PEFT adapter or a quantized base; the
evaluate stage computes the losses with the model it already holds and this module aggregates them.
"""

import math

import datasets
import evaluate


class Perplexity(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description="exp(total NLL / total predicted tokens) over the evaluation sequences.",
            citation="",
            inputs_description="predictions: NLL sum per sequence (float); references: predicted tokens (int).",
            features=datasets.Features(
                {"predictions": datasets.Value("float64"), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references):
        tokens = sum(references)
        if tokens == 0:
            return {"perplexity": float("nan"), "loss": float("nan")}
        loss = sum(predictions) / tokens
        return {"perplexity": math.exp(min(loss, 700.0)), "loss": loss}
