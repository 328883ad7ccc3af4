"""A local `evaluate` metric for the offline tests: the mean token F1 of predictions against references."""

import datasets
import evaluate


class TokenF1(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Mean bag-of-tokens F1 between each prediction and its reference.",
            citation="",
            inputs_description="predictions: list of str; references: list of str",
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references):
        scores = []
        for prediction, reference in zip(predictions, references):
            p, r = prediction.lower().split(), reference.lower().split()
            common = sum(min(p.count(t), r.count(t)) for t in set(p))
            scores.append(0.0 if common == 0 else 2 * common / (len(p) + len(r)))
        return {"token_f1": sum(scores) / len(scores), "n": len(scores)}
