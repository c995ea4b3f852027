"""Steering ids: single tokens in context, special tokens beyond 10 classes, training examples."""

from __future__ import annotations

import pytest

from distalign_ray.data.prompts import build_prompts, chat_prompt_ids
from distalign_ray.data.specs import load_dataset, spec_from_dict
from distalign_ray.data.steering import build_steering_examples, prepare_steering_vocab
from distalign_ray.errors import DistalignError


def _spec(num_classes: int):
    categories = [f"class{chr(97 + i)}" for i in range(num_classes)]
    return spec_from_dict(
        {
            "name": "many",
            "attribute": "letter",
            "categories": categories,
            "contexts": ["alpha", "beta"],
            "target": "uniform",
            "templates": {"attribute": ["Pick for {context}: {categories}."], "story": "s", "prompt_engineering": "{target}"},
        }
    )


def test_digits_are_single_tokens_for_smollm2(tokenizer):
    vocab = prepare_steering_vocab(tokenizer, load_dataset("race-us-even"))
    assert vocab.strings == ["0", "1", "2", "3", "4"]
    assert vocab.token_ids == [32, 33, 34, 35, 36]
    assert not vocab.added_special_tokens


def test_more_than_ten_classes_use_added_special_tokens(tokenizer):
    import copy

    tok = copy.deepcopy(tokenizer)
    vocab = prepare_steering_vocab(tok, _spec(12))
    assert vocab.added_special_tokens and vocab.num_classes == 12
    assert vocab.strings[11] == "<|steer_11|>"
    assert all(i >= len(tokenizer) for i in vocab.token_ids)


def test_more_classes_than_digit_tokens_is_an_error(tokenizer):
    with pytest.raises(DistalignError, match="12 classes but only 10 digit steering tokens"):
        prepare_steering_vocab(tokenizer, _spec(12), kind="digits")


def test_steering_id_that_merges_with_the_answer_is_rejected():
    """A real BPE tokenizer whose digits merge with the following letters fails the in-context check."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="[UNK]"))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(special_tokens=["[UNK]", "<eos>"], vocab_size=200)
    bpe.train_from_iterator(["0Classa 1Classb " * 50, "Pick for alpha beta: Classa, Classb."] * 20, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>", pad_token="<eos>")
    tok.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    with pytest.raises(DistalignError, match="is not a single token in context"):
        prepare_steering_vocab(tok, _spec(2), kind="digits")


def test_training_examples_bind_ids_to_answers(tokenizer):
    spec = load_dataset("gender-uk-real")
    vocab = prepare_steering_vocab(tokenizer, spec)
    examples = build_steering_examples(spec, tokenizer, vocab)
    assert len(examples) == 25 * 2 * 4  # contexts x templates x (2 desirable + 2 undesirable)
    male = tokenizer("Male", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    first = [e for e in examples if e.context_index == 0 and e.template == "attribute_0"]
    assert [(e.steering_index, e.desirable) for e in first] == [(0, True), (0, False), (1, False), (1, True)]
    assert first[0].answer_ids == male and first[2].answer_ids == male
    assert first[0].target == spec.targets[0]
    # The prompt ends with the assistant header, so the steering id is the first assistant token.
    assert tokenizer.decode(first[0].prompt_ids).endswith("<|im_start|>assistant\n")


def test_prompts_cover_every_context_and_template(tokenizer):
    spec = load_dataset("sentiment-us-even")
    rows = build_prompts(spec, "attribute")
    assert len(rows) == 14 * 2
    assert "Positive, Negative, or Neutral" in rows[0].user_prompt
    stated = build_prompts(spec, "attribute", state_target=True)[0].user_prompt
    assert "Positive 33%, Negative 33%, Neutral 33%" in stated
    story = build_prompts(spec, "story")
    assert len(story) == 14 and "story" in story[0].user_prompt
    ids = chat_prompt_ids(tokenizer, rows[0])
    assert ids.count(tokenizer.convert_tokens_to_ids("<|im_start|>")) == 3  # system, user, assistant: no doubled BOS


def test_ift_answers_follow_target_proportions(tokenizer):
    from distalign_ray.data.baselines import build_dpo_pairs, build_ift_examples, proportional_counts

    assert proportional_counts([0.99, 0.01], 10) == [10, 0]
    assert proportional_counts([0.64, 0.36], 10) == [6, 4]
    assert proportional_counts([1 / 3] * 3, 10) == [4, 3, 3]
    spec = load_dataset("gender-us-real").subset(2)
    assert proportional_counts([0.964, 0.036], 100) == [96, 4]
    examples = build_ift_examples(spec, tokenizer)  # 100 per context, the default
    assert len(examples) == 2 * 100 and all(e.steering_index is None for e in examples)
    male = tokenizer("Male", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    for index, target in enumerate(spec.targets):
        mine = [e for e in examples if e.context_index == index]
        assert sum(e.answer_ids == male for e in mine) == proportional_counts(target, 100)[0]  # to 1/100
        per_template = [sum(e.template == t for e in mine) for t in ("attribute_0", "attribute_1")]
        assert per_template == [50, 50]
    pairs = build_dpo_pairs(spec, tokenizer, pairs_per_context=10)
    assert len(pairs) == 20 and all(p.chosen_ids != p.rejected_ids for p in pairs)
