import numpy as np
import pytest

from moalign import objectives
from moalign.errors import MoalignError
from moalign.objectives.lexical import flesch_reading_ease


def test_registry_lists_every_kind():
    table = objectives.describe()
    for kind in ("hf", "vader", "readability", "profanity", "length", "brevity", "relevance", "python"):
        assert kind in table


def test_parse_spec_options():
    assert objectives.parse_spec("hf:org/name?logit=1&input=pair&name=humor") == (
        "hf",
        "org/name",
        {"logit": 1, "input": "pair", "name": "humor"},
    )


def test_unknown_objective_is_one_line_error():
    with pytest.raises(MoalignError, match="unknown objective 'nope'") as error:
        objectives.build("nope")
    assert "\n" not in str(error.value)


def test_lexical_scorers():
    prompts = ["q"] * 3
    responses = ["I love this, it is wonderful!", "This is terrible and awful.", "one two three four"]
    vader = objectives.build("vader").score(prompts, responses)
    assert vader[0] > 0.5 > -0.5 > vader[1]
    assert objectives.build("length").score(prompts, responses).tolist() == [6, 5, 4]
    assert objectives.build("brevity").score(prompts, responses).tolist() == [-6, -5, -4]
    clean = objectives.build("profanity").score(["q", "q"], ["a nice clean sentence", "what the fuck man"])
    assert clean[0] == 1.0 and clean[1] == pytest.approx(0.75)


def test_readability_works_offline_with_pyphen():
    easy = flesch_reading_ease("The cat sat. The dog ran.")
    hard = flesch_reading_ease(
        "Interdisciplinary epistemological considerations necessitate comprehensive reevaluation."
    )
    assert easy > 80 > hard
    scores = objectives.build("readability").score(["q", "q"], ["The cat sat.", ""])
    assert scores[0] > 100 and scores[1] == 0.0


def test_relevance_with_bundled_minilm():
    relevance = objectives.build("relevance")
    prompts = ["How do I cook rice?", "How do I cook rice?"]
    scores = relevance.score(prompts, ["Rinse the rice and simmer it in water.", "The stock market fell today."])
    assert scores[0] > scores[1]
    assert np.all(np.abs(scores) <= 1.0 + 1e-6)


def test_relevance_precisions_agree_but_are_cached_apart():
    prompts = ["How do I cook rice?"] * 2
    responses = ["Rinse the rice and simmer it in water.", "The stock market fell today."]
    full, half = objectives.build("relevance?dtype=float32"), objectives.build("relevance?dtype=bfloat16")
    assert np.allclose(full.score(prompts, responses), half.score(prompts, responses), atol=0.02)
    assert full.cache_key != half.cache_key


def user_scorer(prompts, responses, bonus=0.0):
    return [len(r) + bonus for r in responses]


def nan_scorer(prompts, responses):
    return [float("nan")] * len(responses)


def short_scorer(prompts, responses):
    return [1.0]


def test_python_objective_and_its_checks():
    scores = objectives.build("python:test_objectives:user_scorer?bonus=0.5").score(["a", "b"], ["xx", "y"])
    assert scores.tolist() == [2.5, 1.5]
    with pytest.raises(MoalignError, match="NaN"):
        objectives.build("python:test_objectives:nan_scorer").score(["a"], ["b"])
    with pytest.raises(MoalignError, match="returned 1 scores for 2 samples"):
        objectives.build("python:test_objectives:short_scorer").score(["a", "b"], ["b", "c"])
    with pytest.raises(MoalignError, match="cannot import"):
        objectives.build("python:not_a_module_xyz:f")


def test_hf_reward_model_saved_and_loaded(tiny_classifier):
    prompts = ["the cat sat", "a good day", "travel light and keep your passport safe"]
    responses = ["on the mat", "with friends and good food and sun", "ok"]
    sorted_scores = objectives.build(f"hf:{tiny_classifier}?batch_size=2").score(prompts, responses)
    unsorted = objectives.build(f"hf:{tiny_classifier}?batch_size=2&sort=false").score(prompts, responses)
    assert np.allclose(sorted_scores, unsorted, atol=1e-5)  # sorting is only an efficiency
    # The score is logit 0 of the model on prompt + response, computed here by hand for one sample.
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_classifier)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_classifier)
    with __import__("torch").no_grad():
        direct = model(**tokenizer(prompts[1] + responses[1], return_tensors="pt")).logits[0, 0].item()
    assert sorted_scores[1] == pytest.approx(direct, abs=1e-5)


def test_hf_logit_option_checked(tmp_path):
    from conftest import build_classifier

    path = build_classifier(tmp_path / "two", num_labels=2)
    scores = objectives.build(f"hf:{path}?logit=1").score(["a"], ["b"])
    assert scores.shape == (1,)
    with pytest.raises(MoalignError, match="logit=2"):
        objectives.build(f"hf:{path}?logit=2")
    with pytest.raises(MoalignError, match="cannot load"):
        objectives.build(f"hf:{tmp_path}/missing")
