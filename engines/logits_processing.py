"""What the sampling parameters do to one row's logits before a token is chosen, with the definitions the OpenAI
API (and vLLM, llama.cpp, Hugging Face for the extensions) give them:

* ``repetition_penalty`` p (extension): the logit of every token seen so far, in the prompt or the output, is
  divided by p where positive and multiplied by p where negative (p > 1 discourages repeats, 1 does nothing);
* ``frequency_penalty`` f and ``presence_penalty`` q (OpenAI, -2 to 2): ``logit[t] -= f * count[t] + q * (count[t]
  > 0)``, counting each token's occurrences in the output so far;
* ``logit_bias`` (OpenAI, -100 to 100 per token id): added to the logit;
* ``min_p`` m (extension): after the temperature, tokens whose probability is below m times the most likely token's
  are dropped (:func:`min_p_mask`).

Everything runs on the scheduler's thread, on a float array it may edit in place.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np


def penalize(scores: np.ndarray, *, output_counts: Mapping[int, int], prompt_ids: np.ndarray | None,
             repetition_penalty: float = 1.0, frequency_penalty: float = 0.0, presence_penalty: float = 0.0,
             logit_bias: Mapping[int, float] | None = None) -> np.ndarray:
    """``scores`` (one row, ``[vocab]``) with the penalties and bias applied, in place; ``output_counts`` are the
    generated tokens so far and how often each came, ``prompt_ids`` the prompt's distinct ids."""
    if repetition_penalty != 1.0:
        seen = np.fromiter(output_counts.keys(), np.int64, len(output_counts))
        if prompt_ids is not None and prompt_ids.size:
            seen = np.union1d(seen, prompt_ids)
        if seen.size:
            values = scores[seen]
            scores[seen] = np.where(values > 0, values / repetition_penalty, values * repetition_penalty)
    if (frequency_penalty or presence_penalty) and output_counts:
        ids = np.fromiter(output_counts.keys(), np.int64, len(output_counts))
        counts = np.fromiter(output_counts.values(), np.float64, len(output_counts))
        scores[ids] -= frequency_penalty * counts + presence_penalty
    if logit_bias:
        ids = np.fromiter(logit_bias.keys(), np.int64, len(logit_bias))
        scores[ids] += np.fromiter(logit_bias.values(), np.float64, len(logit_bias))
    return scores


def min_p_mask(scaled: np.ndarray, min_p: float) -> np.ndarray:
    """``scaled`` (temperature applied) with every token less likely than ``min_p`` times the most likely one set
    to -inf: ``p[t] < min_p * max(p)`` is ``scaled[t] < max(scaled) + log(min_p)``."""
    if min_p <= 0:
        return scaled
    return np.where(scaled >= scaled.max() + np.log(min_p), scaled, -np.inf)
