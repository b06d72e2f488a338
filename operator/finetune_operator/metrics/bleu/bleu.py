"""Corpus BLEU (sacrebleu), as an Evaluate metric loaded by path."""

import datasets
import evaluate
import sacrebleu


class Bleu(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description="Corpus BLEU (0-100) computed by sacrebleu with its default 13a tokenizer.",
            citation="Post, A Call for Clarity in Reporting BLEU Scores, WMT 2018.",
            inputs_description="predictions: list of str; references: list of str (one reference each).",
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references):
        result = sacrebleu.corpus_bleu(list(predictions), [list(references)])
        return {"bleu": float(result.score)}
