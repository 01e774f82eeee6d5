"""How an edit of a model is scored (docs/method.md, "Editing with the found neurons"), in MMEdit's terms (Cheng et
al., 2023).

Every measure compares the model in some state (a *variant*: an edit applied, the banned-words filter armed, or the
unedited model itself) with the unedited model, on one object k's ``Probe``. A rate counts only the inputs on which the
unedited model showed the knowledge (its caption named k; it answered yes; the other image's caption named that
image's object): the others have nothing to change. ``*_n`` says how many inputs a rate counts.

reliability    the identification images (the edit's own inputs): the fraction of captions that show the target's
               effect (``EditTarget.caption_success``: erase, no longer naming k; swap, naming k' and not k).
               ``reliability_tf``: teacher-forced target accuracy, at the position of the unedited caption that predicts
               k (its context before k): ``EditTarget.top_success`` of the top-1 token (erase, none of k's word ids;
               swap, one of k''s).
m_generality   the same on held-out images of k, never used to identify neurons or to fit an edit.
t_generality   other prompts on the held-out images of k: "what" (what is in this image?) and "rephrased" (another
               caption prompt) scored as captions; "yes_no" (is there a k in this image?), ``EditTarget.answered``:
               erase succeeds where the logit of No passes Yes's, swap where it does for k and Yes passes No for k'.
m_locality     images without k: S_re (the image's own object still named), BLEU and BERTScore of the captions against
               the unedited captions, and top-1 agreement: the fraction of the unedited caption's tokens,
               teacher-forced, at which both models rank the same token first.
t_locality     text-only prompts: mean KL(p_unedited || p_variant) of the next token and top-1 agreement; prompts about
               k ("about_k") apart from the rest ("other").
general        the general-ability guard, so that an edit cannot look local while the model degrades: captions of a
               fixed set of images that show none of the edited objects (BLEU and BERTScore against the unedited
               captions; ``mentions_kept``, the fraction of the catalog objects an unedited caption named that the
               variant's caption still names; ``leak``, the fraction of captions that did not name the target's goal,
               k' for a swap and k for an erase, that name it now), and next-token KL and top-1 agreement after each
               of a fixed set of text-only prompts (``texts``; ``knexp/evaluation/general_texts.txt`` by default).
fluency        over every caption of the variant: the mean entropy of its 2- and 3-gram distributions (bits), and
               repetition, the fraction of its 3-grams that repeat an earlier one.
Captions go through the caption store, keyed by the variant's identity, so a rerun reads them back.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from knexp.data.catalog import Knowledge
from knexp.editing.forcing import forced_caption, last_logits, target_context
from knexp.editing.prompts import Prompts
from knexp.editing.target import EditTarget
from knexp.evaluation.text_metrics import bertscore_f1
from knexp.models.captioning import Captioner
from knexp.settings import prompt_file

YES, NO = ("Yes", "yes"), ("No", "no")


@dataclass
class Probe:
    """What one object's edits are measured on, for ``target``: images as (key, image, own object) rows, ``ident``
    (reliability), ``held`` (M-generality, T-generality) and ``others`` (M-locality); text-only prompts ``texts`` and
    ``k_texts``; the general-ability guard's images ``general`` and prompts ``general_texts``, and the objects whose
    mentions it follows (``objects``)."""

    target: EditTarget
    ident: list[tuple[list, np.ndarray, Knowledge]]
    held: list[tuple[list, np.ndarray, Knowledge]]
    others: list[tuple[list, np.ndarray, Knowledge]]
    texts: list[str]
    k_texts: list[str]
    prompts: Prompts = field(default_factory=Prompts)
    general: list[tuple[list, np.ndarray, Knowledge | None]] = field(default_factory=list)
    general_texts: list[str] = field(default_factory=list)
    objects: list[Knowledge] = field(default_factory=list)


@dataclass
class Variant:
    """A state of the model: ``name``, the identity its captions are stored under (``key``) and a context manager that
    puts the model in that state for a block (``state()``)."""

    name: str
    key: str
    state: Callable[[], AbstractContextManager]


def _rate(values) -> float | None:
    values = list(values)
    return float(np.mean(values)) if values else None


def _yes_minus_no(adapter, images: list[np.ndarray], question: str, batch: int) -> list[float]:
    """max logit over the Yes forms minus max over the No forms, after ``question`` on each image with an empty
    prefix."""
    yes = [adapter.tokenize(w)[0] for w in YES] + [adapter.tokenize(" " + w)[0] for w in YES]
    no = [adapter.tokenize(w)[0] for w in NO] + [adapter.tokenize(" " + w)[0] for w in NO]
    out = []
    for i in range(0, len(images), batch):
        logits = last_logits(adapter, adapter.prepare(images[i:i + batch], prefix="", question=question))  # [b, V]
        out += (logits[:, yes].amax(-1) - logits[:, no].amax(-1)).tolist()
    return out


class EditMeasures:
    """Scores variants of one model on one ``Probe`` (module docstring); the unedited model's outputs are computed
    once."""

    def __init__(self, captioner: Captioner, probe: Probe, bertscore_model: str | None = None,
                 bertscore_layers: int = 6):
        self.captioner, self.probe = captioner, probe
        self.adapter = captioner.adapter
        self.bertscore_model, self.bertscore_layers = bertscore_model, bertscore_layers
        self.base = self._outputs(Variant("unedited", captioner.model_key, nullcontext))

    # ---- what a variant produces ----------------------------------------------------------------------------------
    def _captions(self, variant: Variant, rows, question: str | None = None, prefix: str | None = None) -> list[str]:
        return self.captioner.renamed(variant.key)([im for _, im, _ in rows], [key for key, _, _ in rows], question,
                                                   prefix)

    @torch.no_grad()
    def _outputs(self, variant: Variant) -> dict:
        p, adapter = self.probe, self.adapter
        unedited = variant.name == "unedited"
        out = {}
        with variant.state():
            for group in ("ident", "held", "others"):
                out[group] = self._captions(variant, getattr(p, group))
            out["what"] = self._captions(variant, p.held, p.prompts.what)
            out["rephrased"] = self._captions(variant, p.held, p.prompts.rephrased, p.prompts.rephrased_prefix)
            held = [im for _, im, _ in p.held]
            asked = [_yes_minus_no(adapter, held, p.prompts.yes_no.format(a_k=o.indefinite), self.captioner.batch_size)
                     for o in p.target.asked]
            # per image: Yes - No of each object
            out["yes_no"] = [list(margins) for margins in zip(*asked, strict=True)]
            out["texts"] = adapter.text_logits(p.texts) if p.texts else None
            out["k_texts"] = adapter.text_logits(p.k_texts) if p.k_texts else None
            out["general"] = self._captions(variant, p.general)
            out["general_texts"] = text_logits(adapter, p.general_texts, self.captioner.batch_size)
            reference = out if unedited else self.base  # teacher forcing always follows the unedited captions
            out["tf"] = {g: self._target_tops(getattr(p, g), reference[g]) for g in ("ident", "held")}
            out["caption_tops"] = self._caption_tops(reference["others"])
        return out

    def _target_tops(self, rows, clean: list[str]) -> list[int]:
        """The top-1 token at the position predicting k in each unedited caption that names k (teacher-forced)."""
        tops = []
        for (_, image, _), caption in zip(rows, clean, strict=True):
            context = target_context(self.adapter, caption, self.probe.target.knowledge)
            if context is None:
                continue
            prepared = self.adapter.prepare([image], continuations=[context])
            tops.append(int(last_logits(self.adapter, prepared).argmax(-1)))
        return tops

    def _caption_tops(self, captions: list[str]) -> list[torch.Tensor]:
        """long [n_i] per image without k: the top-1 token at each of the n_i positions that predict a token of its
        unedited caption (teacher-forced; the caption prefix is part of the prompt)."""
        tops = []
        for (_, image, _), caption in zip(self.probe.others, captions, strict=True):
            prepared, start = forced_caption(self.adapter, image, caption)
            if prepared.prompt_len <= start:
                tops.append(torch.zeros(0, dtype=torch.long))
                continue
            # [n]: each predicts the next
            here = torch.arange(start - 1, prepared.prompt_len - 1, device=self.adapter.device)
            tops.append(self.adapter.forward(prepared, positions=here)[0].argmax(-1).cpu())
        return tops

    # ---- scores ---------------------------------------------------------------------------------------------------
    def score(self, variant: Variant) -> dict:
        """Every measure of the module docstring for ``variant``, its captions included."""
        p, base = self.probe, self.base
        out = base if variant.name == "unedited" else self._outputs(variant)
        target, k = p.target, p.target.knowledge
        goal = target.goal_ids(self.adapter).tolist()

        def tf_rate(tops):
            return _rate(target.top_success(t, goal) for t in tops)

        def success(group: str) -> dict:
            """The success rate over the rows of ``group`` whose unedited answer named k (the others have nothing to
            change), and how many those are."""
            rows = [target.caption_success(c) for c, c0 in zip(out[group], base[group], strict=True)
                    if k.mentioned_in(c0)]
            return {"rate": _rate(rows), "n": len(rows)}

        yes_no = [target.answered(m) for m, m0 in zip(out["yes_no"], base["yes_no"], strict=True) if m0[0] > 0]
        kept = [own.mentioned_in(c) for c, c0, (_, _, own) in zip(out["others"], base["others"], p.others, strict=True)
                if own.mentioned_in(c0)]
        same = sum(int((a == b).sum()) for a, b in zip(out["caption_tops"], base["caption_tops"], strict=True))
        total = sum(len(b) for b in base["caption_tops"])
        ident, held = success("ident"), success("held")
        generality = {"what": success("what"), "rephrased": success("rephrased"),
                      "yes_no": {"rate": _rate(yes_no), "n": len(yes_no)}}
        scores = {
            "reliability": ident["rate"], "reliability_n": ident["n"],
            "reliability_tf": tf_rate(out["tf"]["ident"]),
            "m_generality": held["rate"], "m_generality_n": held["n"],
            "m_generality_tf": tf_rate(out["tf"]["held"]),
            "t_generality": {name: v["rate"] for name, v in generality.items()},
            "t_generality_n": {name: v["n"] for name, v in generality.items()},
            "m_locality": {"S_re": _rate(kept), "n": len(kept), **self._similarity(out["others"], base["others"]),
                           "top1": same / total if total else None},
            "t_locality": {"other": logit_agreement(base["texts"], out["texts"]),
                           "about_k": logit_agreement(base["k_texts"], out["k_texts"])},
            "general": {"images": len(p.general), **self._similarity(out["general"], base["general"]),
                        **mentions_kept(out["general"], base["general"], p.objects),
                        **leak(out["general"], base["general"], target.goal),
                        "texts": logit_agreement(base["general_texts"], out["general_texts"])},
            "fluency": fluency([c for g in ("ident", "held", "others") for c in out[g]]),
        }
        scores["t_generality"]["mean"] = _rate(v for v in scores["t_generality"].values() if v is not None)
        scores["captions"] = {g: out[g] for g in ("ident", "held", "others", "what", "rephrased", "general")}
        return scores

    def _similarity(self, captions: list[str], references: list[str]) -> dict:
        return similarity(captions, references, self.bertscore_model, self.bertscore_layers)


def similarity(captions: list[str], references: list[str], bertscore_model: str | None, bertscore_layers: int) -> dict:
    """BLEU (sacrebleu's corpus BLEU, 0-1) and BERTScore F1 of ``captions`` against the unedited ones."""
    import sacrebleu

    if not captions:
        return {"bleu": None, "bertscore_f1": None}
    return {"bleu": sacrebleu.corpus_bleu(captions, [references]).score / 100.0,
            "bertscore_f1": bertscore_f1(captions, references, bertscore_model, bertscore_layers)}


@torch.no_grad()
def text_logits(adapter, texts: list[str], batch: int) -> torch.Tensor | None:
    """float32 [len(texts), V]: the next-token logits after each text alone, in batches of ``batch``."""
    chunks = [adapter.text_logits(texts[i:i + batch]) for i in range(0, len(texts), batch)]
    return torch.cat(chunks) if chunks else None


def read_prompts(path: str | None, key: str) -> list[str]:
    """The general-ability guard's prompts: the file ``path`` (one per line), or ``knexp/evaluation/general_texts.txt``
    where it is None; ``key`` names the setting in an error."""
    return prompt_file(path, key, "knexp.evaluation", "general_texts.txt")


def mentions_kept(captions: list[str], references: list[str], objects: list[Knowledge]) -> dict:
    """Over every (caption, object) where the unedited caption (``references``) names one of ``objects``: the fraction
    whose edited caption still names it (``mentions_kept``), and how many such pairs there are (``mentions_n``)."""
    kept = [o.mentioned_in(c) for c, c0 in zip(captions, references, strict=True) for o in objects
            if o.mentioned_in(c0)]
    return {"mentions_kept": _rate(kept), "mentions_n": len(kept)}


def leak(captions: list[str], references: list[str], goal: Knowledge) -> dict:
    """Over the captions whose unedited version (``references``) does not name ``goal`` (a swap's k', an erase's k):
    the fraction that name it now (``leak``: the edit writes its object where it is not), and how many (``leak_n``)."""
    named = [goal.mentioned_in(c) for c, c0 in zip(captions, references, strict=True) if not goal.mentioned_in(c0)]
    return {"leak": _rate(named), "leak_n": len(named)}


def logit_agreement(base: torch.Tensor | None, other: torch.Tensor | None) -> dict:
    """Mean KL(softmax(base) || softmax(other)) per prompt (nats; None with ``kl_infinite`` where ``other`` gives no
    probability to a token ``base`` may emit, as the banned-words filter does) and the fraction of prompts whose top-1
    token agrees; ``base`` and ``other`` float [B, V] logits."""
    if base is None or other is None:
        return {"kl": None, "kl_infinite": False, "top1": None, "prompts": 0}
    kl = float(F.kl_div(F.log_softmax(other, -1), F.log_softmax(base, -1), log_target=True, reduction="batchmean"))
    top1 = float((base.argmax(-1) == other.argmax(-1)).float().mean())
    return {"kl": kl if math.isfinite(kl) else None, "kl_infinite": not math.isfinite(kl), "top1": top1,
            "prompts": int(base.shape[0])}


def _ngrams(words: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]


def fluency(captions: list[str]) -> dict:
    """Mean over captions of the entropy (bits) of its 2-gram and 3-gram distributions (averaged), and the mean fraction
    of a caption's 3-grams that repeat an earlier one (0: none repeats); words are lower-cased whitespace tokens."""
    entropies, repeats = [], []
    for caption in captions:
        words = caption.lower().split()
        per_n = []
        for n in (2, 3):
            counts = Counter(_ngrams(words, n))
            total = sum(counts.values())
            if total:
                per_n.append(-sum(c / total * math.log2(c / total) for c in counts.values()))
        if per_n:
            entropies.append(sum(per_n) / len(per_n))
        tri = _ngrams(words, 3)
        if tri:
            repeats.append(1 - len(set(tri)) / len(tri))
    return {"ngram_entropy": _rate(entropies), "repetition": _rate(repeats)}
