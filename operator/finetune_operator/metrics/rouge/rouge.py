"""ROUGE-1/2/L F-measure (rouge-score), as an Evaluate metric loaded by path."""

import datasets
import evaluate
from rouge_score import rouge_scorer, scoring


class Rouge(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description="Mean ROUGE F-measures (0-1) from Google's rouge-score, with stemming.",
            citation="Lin, ROUGE: A Package for Automatic Evaluation of Summaries, 2004.",
            inputs_description="predictions: list of str; references: list of str.",
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references):
        types = ["rouge1", "rouge2", "rougeL"]
        scorer = rouge_scorer.RougeScorer(types, use_stemmer=True)
        aggregator = scoring.BootstrapAggregator()
        for prediction, reference in zip(predictions, references, strict=True):
            aggregator.add_scores(scorer.score(reference, prediction))
        result = aggregator.aggregate()
        return {name: float(result[name].mid.fmeasure) for name in types}
