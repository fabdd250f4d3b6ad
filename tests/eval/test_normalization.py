"""The official VQA normalisation, checked on the worked examples of reference/vqa_normalization.md §8."""

import pytest

from instructblip.eval.normalization import (
    ARTICLES,
    CONTRACTIONS,
    NUMBER_WORDS,
    PUNCTUATION,
    normalize_answer,
    normalize_evalai,
    process_digit_article,
    process_punctuation,
)


def test_tables_have_the_official_sizes():
    assert len(PUNCTUATION) == 21 and len(set(PUNCTUATION)) == 21
    assert len(NUMBER_WORDS) == 12
    assert ARTICLES == {"a", "an", "the"}
    assert len(CONTRACTIONS) == 120
    assert CONTRACTIONS["somebody'd"] == "somebodyd"  # reversed in the official file, kept


@pytest.mark.parametrize(
    "text, after_punctuation, after_digit_article",
    [
        ("Two dogs.", "Two dogs", "2 dogs"),
        ("3.5", "3.5", "3.5"),
        ("mr. smith", "mr smith", "mr smith"),
        ("1,000", "1000", "1000"),
        ("a, b", "a b", "b"),
        ("yes!", "yes ", "yes"),
        ("red/blue", "red blue", "red blue"),
        ("dont", "dont", "don't"),
        ("The cat's", "The cat's", "cat's"),
        ("t-shirt", "t shirt", "t shirt"),
        ("none", "none", "0"),
        ("Ten", "Ten", "10"),
        ("10:30", "10:30", "10:30"),
        ("u.s.a.", "usa", "usa"),
        ("50%", "50%", "50%"),
        ("a-b, c", "a b c", "b c"),
        ("A", "A", ""),
    ],
)
def test_worked_examples(text, after_punctuation, after_digit_article):
    assert process_punctuation(text) == after_punctuation
    assert process_digit_article(after_punctuation) == after_digit_article
    assert normalize_answer(text) == after_digit_article


def test_edge_cases():
    # digits with commas: the digit-comma-digit condition deletes every punctuation mark, spaced or not
    assert process_punctuation("1,000-2,000 (approx)") == "10002000 approx"
    # a decimal point survives, a trailing one does not, ".5" keeps its point
    assert normalize_answer("2.5.") == "2.5" and normalize_answer(".5") == ".5"
    # only the first 32 periods go (the official call passes re.UNICODE=32 as count)
    assert process_punctuation("." * 40) == "." * 8
    # numbers above ten are not mapped; articles go only as whole tokens
    assert normalize_answer("Eleven apples") == "eleven apples"
    assert normalize_answer("an anteater") == "anteater"
    # contractions only as whole lower-case tokens; capital-I keys are unreachable
    assert normalize_answer("Whats up") == "what's up"
    assert normalize_answer("Im") == "im"
    # newline and tab handling
    assert normalize_answer("\tthe\nred  car ") == "red car"


def test_evalai_processor():
    assert normalize_evalai("Dakota, Digital?") == "dakota digital"
    assert normalize_evalai("The dog's bone") == "dog 's bone"
    assert normalize_evalai("1,000") == "1000"
    assert normalize_evalai("Two.") == "2"
