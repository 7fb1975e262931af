"""Generation scores against references nobody here wrote: SacreBLEU for BLEU, torchmetrics for ROUGE-L, and
the per-example scores that add up to the corpus figures a run reports."""

import pytest

from moe_prefix.train import e2e_slots, text_scores
from moe_prefix.train.generation import corpus_metrics, generation_scores, score_rows

sacrebleu = pytest.importorskip("sacrebleu")  # in the dev extra

HYPOTHESES = [
    "The cat sat on the mat.",
    "Blue Spice is a coffee shop in the city centre, rated 5 out of 5.",
    "It costs $36.00 per day - is that ok?",
    "A dog",  # shorter than 4 words: no 3- or 4-grams
    "Nothing in common here",
    "",
]
REFERENCES = [
    ["The cat is on the mat.", "There is a cat on the mat."],
    ["Blue Spice, a coffee shop in the city centre, has a 5 out of 5 rating.", "In the city centre is Blue Spice."],
    ["The price is $36.00 a day; is that ok?"],
    ["A dog catches a frisbee.", "The dog runs.", "Dogs play."],
    ["Completely different words.", "Another one."],
    ["Something."],
]


def _sacrebleu_streams(references):
    """SacreBLEU takes one stream per reference position; inputs with fewer references get None."""
    width = max(map(len, references))
    return [[refs[i] if i < len(refs) else None for refs in references] for i in range(width)]


def test_tokenize_13a_matches_sacrebleu():
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

    tok = Tokenizer13a()
    for text in [*HYPOTHESES, "3.5, 1,000 and 2-3 &amp; a&lt;b <skipped> x-\ny {a} [b] (c)"]:
        assert text_scores.tokenize_13a(text) == tok(text).split()


@pytest.mark.parametrize("n", [1, 2, 3, len(HYPOTHESES)])
def test_multi_reference_corpus_bleu_equals_sacrebleu(n):
    hyps, refs = HYPOTHESES[:n], REFERENCES[:n]
    ours = text_scores.corpus_bleu([text_scores.bleu_stats(h, r) for h, r in zip(hyps, refs, strict=True)])
    assert ours == pytest.approx(sacrebleu.corpus_bleu(hyps, _sacrebleu_streams(refs)).score, abs=1e-9)
    assert generation_scores(hyps, refs)["bleu"] == pytest.approx(ours, abs=1e-12)


def test_sentence_bleu_equals_sacrebleu_sentence_bleu():
    for hyp, refs in zip(HYPOTHESES, REFERENCES, strict=True):
        expected = sacrebleu.sentence_bleu(hyp, refs).score  # exp smoothing, effective order
        assert text_scores.bleu_stats(hyp, refs).score(effective_order=True) == pytest.approx(expected, abs=1e-9), hyp


def test_closest_reference_length_prefers_the_shorter_on_a_tie():
    stats = text_scores.bleu_stats("a b c", ["a b", "a b c d"])  # both differ by one word
    assert stats.ref_len == 2
    assert stats.score() == pytest.approx(sacrebleu.corpus_bleu(["a b c"], [["a b"], ["a b c d"]]).score)


def test_rouge_l_equals_torchmetrics_corpus_figure():
    from torchmetrics.functional.text import rouge_score

    per_example = text_scores.rouge_l(HYPOTHESES, REFERENCES)
    corpus = rouge_score(HYPOTHESES, REFERENCES, rouge_keys="rougeL", accumulate="best")["rougeL_fmeasure"]
    assert sum(per_example) / len(per_example) == pytest.approx(100 * float(corpus), abs=1e-4)


def test_concept_coverage_counts_inflected_forms():
    concepts = text_scores.parse_concepts("dog frisbee catch throw")
    assert concepts == ["dog", "frisbee", "catch", "throw"]
    assert text_scores.concept_coverage("The dogs catch a frisbee.", concepts) == 0.75
    assert text_scores.concept_coverage("A man is running and stopped.", ["run", "stop", "man"]) == 1.0
    assert text_scores.concept_coverage("Nothing.", ["run"]) == 0.0


def _rows():
    e2e = [
        ("name: Blue Spice, eatType: coffee shop, area: city centre", "Blue Spice is a pub by the river."),
        ("name: Alimentum, food: Italian", "Alimentum serves Italian food."),
        ("name: Zizzi, eatType: pub, priceRange: cheap, area: riverside", "Zizzi is a cheap pub."),
    ]
    rows = [
        {"input": mr, "prediction": text, "references": [f"{text} Yes.", "Another one."], "source": "e2e_nlg"}
        for mr, text in e2e
    ]
    rows += [
        {"input": "dog frisbee catch", "prediction": "A dog catches it.", "references": ["A dog catches a frisbee."]},
        {"input": "ski mountain", "prediction": "Skiing on a mountain.", "references": ["He skis down the mountain."]},
    ]
    for r in rows[3:]:
        r["source"] = "common_gen"
    rows.append(
        {"input": "(A | p | B)", "prediction": "A p B.", "references": ["A p B.", "B of A."], "source": "webnlg_en"}
    )
    return rows


def test_per_example_scores_add_up_to_the_corpus_figures():
    rows = _rows()
    score_rows(rows)
    metrics = corpus_metrics(rows)
    # ROUGE-L and coverage are means over examples; SER is all errors over all slots
    assert metrics["val/rougeL"] == pytest.approx(sum(r["rougeL"] for r in rows) / len(rows))
    cg = [r for r in rows if r["source"] == "common_gen"]
    assert metrics["val/coverage/common_gen"] == pytest.approx(sum(r["coverage"] for r in cg) / 2)
    assert cg[1]["coverage"] == 100.0 and cg[0]["coverage"] == pytest.approx(200 / 3)
    e2e = [r for r in rows if r["source"] == "e2e_nlg"]
    expected_ser = 100 * e2e_slots.slot_error_rate([r["prediction"] for r in e2e], [r["input"] for r in e2e])
    assert expected_ser > 0 and metrics["val/ser/e2e_nlg"] == pytest.approx(expected_ser)
    assert "ser" not in cg[0] and "coverage" not in e2e[0]  # only where defined
    # BLEU: the per-example statistics summed give SacreBLEU's corpus BLEU, overall and per source
    hyps, refs = [r["prediction"] for r in rows], [r["references"] for r in rows]
    assert metrics["val/bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyps, _sacrebleu_streams(refs)).score)
    for source in ("e2e_nlg", "common_gen", "webnlg_en"):
        part = [r for r in rows if r["source"] == source]
        streams = _sacrebleu_streams([r["references"] for r in part])
        expected = sacrebleu.corpus_bleu([r["prediction"] for r in part], streams).score
        assert metrics[f"val/bleu/{source}"] == pytest.approx(expected)
    macro = sum(metrics[f"val/bleu/{s}"] for s in ("e2e_nlg", "common_gen", "webnlg_en")) / 3
    assert metrics["val/bleu_macro"] == pytest.approx(macro)
    for r in rows:  # sentence BLEU per example, as sacrebleu.sentence_bleu
        assert r["bleu"] == pytest.approx(sacrebleu.sentence_bleu(r["prediction"], r["references"]).score)


def test_one_source_has_no_macro_or_per_source_keys():
    rows = [r for r in _rows() if r["source"] == "e2e_nlg"]
    score_rows(rows)
    metrics = corpus_metrics(rows)
    assert "val/bleu_macro" not in metrics and "val/bleu/e2e_nlg" not in metrics and "val/ser" in metrics
