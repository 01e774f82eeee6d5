"""Perturbed captions against masked captions (docs/method.md, "Evaluation: against masked captions"): BLEU, ROUGE-1/L
F, BERTScore F1.

Hypothesis = caption under noise; reference = caption of the image with k inpainted away. BLEU is
sacrebleu's corpus BLEU on a 0-1 scale; ROUGE-1 and ROUGE-L are rouge-score's F-measures averaged over
pairs; BERTScore is bert-score's F1 averaged over pairs, with the offline all-MiniLM-L6-v2 folder and
``num_layers=6`` unless another model is named. A pair with an empty side scores 0 on BERTScore (the
library cannot embed an empty string) and is counted as such.
"""

from __future__ import annotations

import sacrebleu
from rouge_score import rouge_scorer


def caption_metrics(hypotheses: list[str], references: list[str], bertscore_model: str | None = None,
                    bertscore_layers: int = 6, batch_size: int = 64) -> dict:
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    if not hypotheses:
        return {"pairs": 0, "bleu": float("nan"), "rouge1": float("nan"), "rougeL": float("nan"),
                "bertscore_f1": float("nan")}
    bleu = sacrebleu.corpus_bleu(hypotheses, [references]).score / 100.0
    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=False)
    rouge = [scorer.score(ref, hyp) for hyp, ref in zip(hypotheses, references, strict=True)]
    return {
        "pairs": len(hypotheses),
        "bleu": bleu,
        "rouge1": sum(r["rouge1"].fmeasure for r in rouge) / len(rouge),
        "rougeL": sum(r["rougeL"].fmeasure for r in rouge) / len(rouge),
        "bertscore_f1": bertscore_f1(hypotheses, references, bertscore_model, bertscore_layers, batch_size),
    }


def bertscore_f1(hypotheses: list[str], references: list[str], model: str | None, num_layers: int,
                 batch_size: int = 64) -> float:
    import bert_score

    from knexp.models.zoo.offline import minilm_folder

    model = model or str(minilm_folder())
    keep = [i for i, (h, r) in enumerate(zip(hypotheses, references, strict=True)) if h.strip() and r.strip()]
    scores = [0.0] * len(hypotheses)
    if keep:
        _, _, f1 = bert_score.score([hypotheses[i] for i in keep], [references[i] for i in keep], model_type=model,
                                    num_layers=num_layers, batch_size=batch_size, verbose=False)
        for i, f in zip(keep, f1.tolist(), strict=True):
            scores[i] = f
    return sum(scores) / len(scores)
