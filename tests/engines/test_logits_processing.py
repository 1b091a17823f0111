"""The sampling parameters over logits, by their definitions (the scheduler's use of them is tested in
test_generation_scheduler.py against a reference that applies the definitions step by step)."""

from __future__ import annotations

import numpy as np

from appliance.engines.logits_processing import min_p_mask, penalize

LOGITS = np.array([3.0, -2.0, 1.0, 0.5, -0.5])


def test_frequency_and_presence_penalties_subtract_per_count_and_once():
    counts = {0: 3, 2: 1}
    out = penalize(LOGITS.copy(), output_counts=counts, prompt_ids=None, frequency_penalty=0.5,
                   presence_penalty=0.25)
    np.testing.assert_allclose(out, [3.0 - 1.5 - 0.25, -2.0, 1.0 - 0.5 - 0.25, 0.5, -0.5])
    negative = penalize(LOGITS.copy(), output_counts=counts, prompt_ids=None, presence_penalty=-1.0)
    np.testing.assert_allclose(negative, [4.0, -2.0, 2.0, 0.5, -0.5])  # a negative penalty encourages repeats


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits_of_seen_tokens():
    out = penalize(LOGITS.copy(), output_counts={0: 1}, prompt_ids=np.array([1, 3]), repetition_penalty=2.0)
    np.testing.assert_allclose(out, [1.5, -4.0, 1.0, 0.25, -0.5])  # tokens 0 (output), 1 and 3 (prompt) seen


def test_logit_bias_is_added_and_min_p_drops_the_unlikely():
    out = penalize(LOGITS.copy(), output_counts={}, prompt_ids=None, logit_bias={4: 100.0, 0: -100.0})
    np.testing.assert_allclose(out, [-97.0, -2.0, 1.0, 0.5, 99.5])
    probs = np.exp(LOGITS) / np.exp(LOGITS).sum()
    kept = np.isfinite(min_p_mask(LOGITS.copy(), 0.1))
    np.testing.assert_array_equal(kept, probs >= 0.1 * probs.max())
    assert kept.tolist() == [True, False, True, False, False]  # e^-2.5 = 0.08 of the top: dropped
    assert np.array_equal(min_p_mask(LOGITS, 0.0), LOGITS)
