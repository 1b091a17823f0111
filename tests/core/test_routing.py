"""The complexity score: features, weights and the bounded cue scan."""

from __future__ import annotations

from appliance.config import RoutingConfig
from appliance.routing import CUE_WINDOW, extract, score


def count(text: str) -> int:
    return len(text.split())


def test_plain_short_prompts_score_low_and_code_maths_reasoning_score_high():
    config = RoutingConfig()
    plain, _ = score(extract("Hi! How are you?", 1, 16, count), config)
    hard, notes = score(extract("Explain step by step why this fails and compare fixes: ```def f(x): return x```"
                                " then solve 3 * 4 = ?", 1, 512, count), config)
    assert plain <= config.small_max_score < config.mid_max_score < hard
    assert any("code" in n for n in notes) and any("reasoning" in n for n in notes)


def test_long_conversations_count_turns_and_tokens():
    config = RoutingConfig()
    short, _ = score(extract("hello", 1, 0, count), config)
    long, notes = score(extract("word " * 3000, 9, 0, count), config)
    assert long > short and "3000 prompt tokens" in notes and "9 turns" in notes


def test_cues_are_read_from_a_bounded_window_only():
    middle = "def f(x): return x\n" * 10
    text = "a" * (2 * CUE_WINDOW) + middle + "a" * (2 * CUE_WINDOW)
    assert extract(text, 1, 0, count).code == 0  # far from both ends: not scanned
    assert extract(middle, 1, 0, count).code > 0
    # Inputs that make backtracking regular expressions quadratic finish (the suite's timeout would catch it).
    for attack in ("1" * 200_000, "first " * 40_000, "{" * 100_000):
        extract(attack, 1, 0, count)
