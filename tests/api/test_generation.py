"""Text generation over HTTP with the openai client: reference parity (also concurrent), streaming, stop strings,
limits, sampling, cancellation, and the incremental detokenizer."""

from __future__ import annotations

import concurrent.futures
import time

import openai
import pytest
import requests
from tokenizers import Tokenizer

from appliance.text_stream import TextAssembler
from appliance.engines.tokenizer import TextEncoder
from conftest import RunningServer, make_config
from reference_data import reference_items


@pytest.fixture(scope="module")
def reference() -> list[dict]:
    return reference_items("smollm2-135m-instruct")


GREEDY = {"temperature": 0, "max_tokens": 48, "extra_body": {"ignore_eos": True}}


@pytest.fixture(scope="module")
def gen_server(smollm2_repo, tmp_path_factory):
    running = RunningServer(make_config(smollm2_repo, tmp_path_factory.mktemp("gen-state"))).start()
    yield running
    running.stop()


@pytest.fixture()
def client(gen_server):
    return openai.OpenAI(base_url=f"{gen_server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def ask(client, item, **options):
    """One reference item through the right endpoint; returns (text, usage, finish_reason)."""
    settings = {**GREEDY, **options}
    if "messages" in item:
        reply = client.chat.completions.create(model="smollm2-135m", messages=item["messages"], **settings)
        return reply.choices[0].message.content, reply.usage, reply.choices[0].finish_reason
    reply = client.completions.create(model="smollm2-135m", prompt=item["raw_prompt"], **settings)
    return reply.choices[0].text, reply.usage, reply.choices[0].finish_reason


def test_exact_tier_matches_the_reference_for_every_item(client, reference):
    for item in reference:
        text, usage, finish = ask(client, item)
        assert text == item["greedy_text"], item.get("messages") or item.get("raw_prompt")
        assert usage.prompt_tokens == len(item["prompt_ids"]) and usage.completion_tokens == 48
        assert finish == "length"


def metric_sum(url: str, name: str) -> float:
    """A counter's value summed over its label sets."""
    lines = requests.get(f"{url}/metrics", timeout=5).text.splitlines()
    return sum(float(line.split()[-1]) for line in lines if line.startswith(name + "{"))


def test_a_repeated_prompt_is_computed_from_the_prefix_its_row_kept_with_the_same_answer(client, gen_server,
                                                                                         reference):
    item = reference[-1]
    ask(client, item)
    before = metric_sum(gen_server.url, "appliance_cached_prompt_tokens_total")
    text, usage, _ = ask(client, item)
    assert text == item["greedy_text"]
    # Every prompt token but the last two (always computed) came from the row the first answer left.
    assert usage.prompt_tokens_details.cached_tokens == usage.prompt_tokens - 2
    assert metric_sum(gen_server.url, "appliance_cached_prompt_tokens_total") - before == usage.prompt_tokens - 2


def test_eight_concurrent_requests_each_match(client, reference):
    items = [reference[i % len(reference)] for i in range(8)]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        texts = list(pool.map(lambda item: ask(client, item)[0], items))
    assert texts == [item["greedy_text"] for item in items]


def test_the_status_page_gives_the_kv_cache_size_the_decoder_allocates(gen_server):
    status = requests.get(f"{gen_server.url}/v1/status", timeout=10).json()
    entry = next(m for m in status["models"] if m["name"] == "smollm2-135m")
    cache = entry["kv_cache"]
    # SmolLM2-135M: 30 layers, K and V, 3 KV heads of 64, float32 on the CPU.
    assert cache["bytes"] == 30 * 2 * cache["rows"] * 3 * cache["tokens_per_row"] * 64 * 4
    assert 0 < cache["bytes_now"] <= cache["bytes"] and cache["dtype"] == "float32" and entry["device"] == "cpu"


def test_streaming_equals_the_whole_answer(client, reference):
    item = reference[0]
    stream = client.chat.completions.create(model="smollm2-135m", messages=item["messages"], stream=True,
                                            stream_options={"include_usage": True}, **GREEDY)
    pieces, usage, finish = [], None, None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert "".join(pieces) == item["greedy_text"]
    assert finish == "length" and usage.completion_tokens == 48


def test_stop_string_ends_the_text_before_it(client, reference):
    item = reference[0]  # "The capital of France is Paris. It's a city ..."
    text, usage, finish = ask(client, item, stop=[" Paris", "never-there"])
    assert text == "The capital of France is" and finish == "stop"
    stream = client.chat.completions.create(model="smollm2-135m", messages=item["messages"], stream=True,
                                            stop="Eiffel Tower", **GREEDY)
    streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert streamed == item["greedy_text"].split("Eiffel Tower")[0]


def test_max_tokens_and_finish_reasons(client, reference):
    text, usage, finish = ask(client, reference[0], max_tokens=5)
    assert usage.completion_tokens == 5 and finish == "length"
    reply = client.chat.completions.create(model="smollm2-135m", messages=reference[0]["messages"], temperature=0,
                                           max_completion_tokens=200)
    assert reply.choices[0].finish_reason == "stop" and reply.usage.completion_tokens < 200  # the model's end


def test_seeded_sampling_is_reproducible(client, reference):
    def sample(seed):
        return client.chat.completions.create(model="smollm2-135m-fast", messages=reference[1]["messages"],
                                              temperature=0.9, top_p=0.95, seed=seed, max_tokens=24,
                                              extra_body={"top_k": 50}).choices[0].message.content
    assert sample(7) == sample(7)
    assert len({sample(s) for s in (1, 2, 3)}) > 1


def test_logprobs(client, reference):
    reply = client.chat.completions.create(model="smollm2-135m", messages=reference[0]["messages"], logprobs=True,
                                           top_logprobs=3, **{**GREEDY, "max_tokens": 4})
    entries = reply.choices[0].logprobs.content
    assert len(entries) == 4 and "".join(e.token for e in entries) == reply.choices[0].message.content
    for entry in entries:
        assert len(entry.top_logprobs) == 3 and entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)  # greedy picks the most likely


def test_cancelled_stream_frees_its_slot(gen_server, reference):
    body = {"model": "smollm2-135m", "messages": reference[0]["messages"], "max_tokens": 1500, "stream": True,
            "temperature": 0, "ignore_eos": True}
    with requests.post(f"{gen_server.url}/v1/chat/completions", json=body, stream=True, timeout=60) as response:
        lines = response.iter_lines()
        for _ in range(4):
            next(lines)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        metrics = requests.get(f"{gen_server.url}/metrics", timeout=10).text
        running = [line for line in metrics.splitlines()
                   if line.startswith('appliance_running_sequences{model="smollm2-135m"')]
        if running and float(running[0].split()[-1]) == 0:
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"the slot was not freed: {running}")
    for name in ("appliance_time_to_first_token_seconds_bucket", "appliance_inter_token_latency_seconds_bucket",
                 "appliance_generated_tokens_total", "appliance_prompt_tokens_total", "appliance_kv_cache_usage_ratio"):
        assert name in metrics


BAD = [
    ({"n": 0}, "n must be an integer from 1 to 128", "n"),
    ({"colour": 1}, "unknown or unsupported field 'colour'", "colour"),
    ({"temperature": 3}, "temperature must be", "temperature"),
    ({"top_logprobs": 2}, "needs logprobs", "top_logprobs"),
    ({"stream_options": {"include_usage": True}}, "stream_options needs stream", "stream_options"),
    ({"messages": []}, "'messages' must be", "messages"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "role", "messages"),
    ({"max_tokens": 0}, "max_tokens must be", "max_tokens"),
    ({"max_tokens": 10_000_000}, "ask for at most", "max_tokens"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "at most 4", "stop"),
    ({"model": "minilm-nope"}, "unknown model", None),
    ({"frequency_penalty": 2.5}, "frequency_penalty must be a number from -2.0 to 2.0", "frequency_penalty"),
    ({"presence_penalty": -3}, "presence_penalty must be a number from -2.0 to 2.0", "presence_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty must be a number from 0.01 to 10", "repetition_penalty"),
    ({"repetition_penalty": 5e-324}, "repetition_penalty must be a number from 0.01 to 10", "repetition_penalty"),
    ({"min_p": 1.5}, "min_p must be a number from 0.0 to 1.0", "min_p"),
    ({"logit_bias": {"the": 1}}, "logit_bias must map token ids", "logit_bias"),
    ({"logit_bias": {"5": 101}}, "logit_bias must map token ids", "logit_bias"),
    ({"logit_bias": {"999999": 1}}, "logit_bias names token id 999999, outside the vocabulary", "logit_bias"),
]


@pytest.mark.parametrize("change,message,param", BAD, ids=[b[1][:20] for b in BAD])
def test_bad_parameters_get_400_naming_the_field(gen_server, change, message, param):
    body = {"model": "smollm2-135m", "messages": [{"role": "user", "content": "hi"}], **change}
    response = requests.post(f"{gen_server.url}/v1/chat/completions", json=body, timeout=30)
    assert response.status_code == (404 if param is None else 400), response.text
    error = response.json()["error"]
    assert message in error["message"] and error["param"] == param


def test_the_penalties_clients_always_send_are_taken_and_change_the_answer(client, reference, smollm2_repo):
    item = next(i for i in reference if "messages" in i)
    plain, _, _ = ask(client, item)
    zero, _, _ = ask(client, item, frequency_penalty=0.0, presence_penalty=0.0)  # what SDKs send by default
    assert zero == plain
    penalized, _, _ = ask(client, item, frequency_penalty=1.5, presence_penalty=1.0)
    assert penalized != plain
    tokenizer = Tokenizer.from_file(str(smollm2_repo / "smollm2-135m" / "1" / "tokenizer.json"))
    token = tokenizer.token_to_id("Ġappliance") or tokenizer.encode(" appliance").ids[0]
    biased = client.chat.completions.create(model="smollm2-135m", messages=item["messages"], temperature=0,
                                            max_tokens=4, logit_bias={str(token): 100},
                                            extra_body={"ignore_eos": True})
    assert biased.choices[0].message.content == tokenizer.decode([token] * 4)


def test_echo_puts_the_prompt_before_the_completion(client, gen_server, reference, smollm2_repo):
    item = next(i for i in reference if "raw_prompt" in i)
    plain = client.completions.create(model="smollm2-135m", prompt=item["raw_prompt"], **GREEDY)
    echoed = client.completions.create(model="smollm2-135m", prompt=item["raw_prompt"], echo=True, **GREEDY)
    assert echoed.choices[0].text == item["raw_prompt"] + plain.choices[0].text
    assert echoed.usage.completion_tokens == plain.usage.completion_tokens
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="smollm2-135m", prompt=item["raw_prompt"], echo=True, stream=True, **GREEDY) if c.choices)
    assert streamed == echoed.choices[0].text
    tokenizer = Tokenizer.from_file(str(smollm2_repo / "smollm2-135m" / "1" / "tokenizer.json"))
    token_ids = tokenizer.encode("The capital of France is").ids
    by_ids = client.completions.create(model="smollm2-135m", prompt=token_ids, echo=True, max_tokens=3,
                                       temperature=0)
    alone = client.completions.create(model="smollm2-135m", prompt=token_ids, max_tokens=3, temperature=0)
    assert by_ids.choices[0].text == "The capital of France is" + alone.choices[0].text  # the ids, decoded
    refused = requests.post(f"{gen_server.url}/v1/completions", json={"model": "smollm2-135m", "prompt": "x",
                                                                      "echo": True, "logprobs": 1}, timeout=30)
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "echo"


def test_incremental_detokenizer_never_splits_characters(smollm2_repo):
    tokenizer = Tokenizer.from_file(str(smollm2_repo / "smollm2-135m" / "1" / "tokenizer.json"))
    text = "Grüße aus Köln! 東京は晴れ 🙂🚀 — naïve café"
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    assembler = TextAssembler(TextEncoder(tokenizer, 8192).stream())
    pieces = [assembler.add(token) for token in ids] + [assembler.finish()]
    assert all("\ufffd" not in piece for piece in pieces)
    assert "".join(pieces) == text
    assert len([p for p in pieces if p]) > 5  # released as it went, not all at the end


def test_stop_string_split_across_tokens_is_never_partly_sent(smollm2_repo, reference):
    tokenizer = Tokenizer.from_file(str(smollm2_repo / "smollm2-135m" / "1" / "tokenizer.json"))
    item = reference[0]
    assembler = TextAssembler(TextEncoder(tokenizer, 8192).stream(), stop=["Eiffel Tower"])
    released = ""
    for token in item["greedy_ids"]:
        released += assembler.add(token)
        assert "Eiff" not in released  # not even the start of the stop string leaks
        if assembler.stopped:
            break
    assert assembler.stopped and released == item["greedy_text"].split("Eiffel Tower")[0]


def wait_for_gauge(url: str, name: str, value: float, timeout_s: float = 60.0) -> None:
    """Poll ``/metrics`` until the gauge ``name`` (summed over its label sets) reads ``value``."""
    deadline = time.monotonic() + timeout_s
    while True:
        lines = requests.get(f"{url}/metrics", timeout=5).text.splitlines()
        if sum(float(line.split()[-1]) for line in lines if line.startswith(name + "{")) == value:
            return
        assert time.monotonic() < deadline, f"{name} did not reach {value} in {timeout_s} s"
        time.sleep(0.05)


def test_waiting_queue_bound_is_503_and_deadline_is_504(smollm2_repo, server_factory, tmp_path):
    import shutil
    import threading

    repo = tmp_path / "repo"
    shutil.copytree(smollm2_repo / "smollm2-135m-fast", repo / "smollm2-135m-fast")
    toml = repo / "smollm2-135m-fast" / "1" / "model.toml"
    toml.write_text(toml.read_text().replace("[generation]\n", "[generation]\nmax_running = 1\nmax_waiting = 1\n"))
    running = server_factory(repo, admission={"enabled": False})  # the scheduler's own bounds, not the lanes'
    url = f"{running.url}/v1/chat/completions"
    long_body = {"model": "smollm2-135m-fast", "messages": [{"role": "user", "content": "Tell a long story."}],
                 "max_tokens": 300, "ignore_eos": True, "temperature": 0}
    results: list = []
    first = threading.Thread(target=lambda: results.append(requests.post(url, json=long_body, timeout=120)))
    first.start()
    wait_for_gauge(running.url, "appliance_running_sequences", 1)  # the first sequence holds the only row
    second = threading.Thread(target=lambda: results.append(requests.post(url, json=long_body, timeout=120)))
    second.start()
    wait_for_gauge(running.url, "appliance_waiting_sequences", 1)  # the second waits: the queue of one is full
    refused = requests.post(url, json=long_body, timeout=30)
    assert refused.status_code == 503 and int(refused.headers["Retry-After"]) >= 1
    assert "waiting" in refused.json()["error"]["message"]
    first.join(120)
    second.join(120)
    assert [r.status_code for r in results] == [200, 200]
    late = requests.post(url, json={**long_body, "timeout": 0.2}, timeout=30)
    assert late.status_code == 504 and "timeout" in late.json()["error"]["message"]


def test_streamed_text_of_a_long_generation_equals_decoding_it_whole(smollm2_repo):
    """Pieces released token by token add up to the text of all the tokens at once, for any token sequence."""
    import random

    tokenizer = Tokenizer.from_file(str(smollm2_repo / "smollm2-135m" / "1" / "tokenizer.json"))
    rng = random.Random(5)
    for _ in range(20):
        ids = [rng.randrange(tokenizer.get_vocab_size()) for _ in range(rng.randrange(1, 400))]
        assembler = TextAssembler(TextEncoder(tokenizer, 8192).stream())
        pieces = [assembler.add(token) for token in ids] + [assembler.finish()]
        assert "".join(pieces) == tokenizer.decode(ids).rstrip("\ufffd")


# -- several choices: n > 1 (one prefill) and a list of prompts -----------------------------------------------


def test_n_greedy_choices_each_match_the_reference_from_one_prefill(client, reference):
    item = next(i for i in reference if "messages" in i)
    reply = client.chat.completions.create(model="smollm2-135m", messages=item["messages"], n=3, **GREEDY)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    # Greedy on rows copied from the one prefilled row: any slip in the copy would change the text.
    assert [c.message.content for c in reply.choices] == [item["greedy_text"]] * 3
    assert [c.finish_reason for c in reply.choices] == ["length"] * 3
    assert reply.usage.prompt_tokens == len(item["prompt_ids"])  # the prompt is read once
    assert reply.usage.completion_tokens == 3 * 48


def test_n_sampled_choices_differ_and_the_first_is_the_lone_request(client, reference):
    item = next(i for i in reference if "messages" in i)
    sampled = {"temperature": 1.0, "seed": 11, "max_tokens": 16, "extra_body": {"ignore_eos": True}}

    def texts(n: int) -> list[str]:
        reply = client.chat.completions.create(model="smollm2-135m", messages=item["messages"], n=n, **sampled)
        return [c.message.content for c in reply.choices]

    four = texts(4)
    assert four == texts(4)  # seeded: the same request draws the same choices
    assert len(set(four)) == 4
    assert four[0] == texts(1)[0]


def test_n_choices_stream_interleaved_each_with_its_end_and_one_usage(client, reference):
    item = next(i for i in reference if "messages" in i)
    whole = client.chat.completions.create(model="smollm2-135m", messages=item["messages"], n=2, seed=5,
                                           temperature=0.8, max_tokens=20, extra_body={"ignore_eos": True})
    stream = client.chat.completions.create(model="smollm2-135m", messages=item["messages"], n=2, seed=5,
                                            temperature=0.8, max_tokens=20, extra_body={"ignore_eos": True},
                                            stream=True, stream_options={"include_usage": True})
    texts, finishes, usages = {0: "", 1: ""}, {}, []
    for chunk in stream:
        if chunk.usage:
            usages.append(chunk.usage)
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
    assert texts == {c.index: c.message.content for c in whole.choices}
    assert finishes == {0: "length", 1: "length"}
    assert len(usages) == 1 and usages[0].completion_tokens == 40


def test_a_list_of_prompts_answers_each_with_n_choices_in_order(client, gen_server, reference):
    item = next(i for i in reference if "raw_prompt" in i)
    second = "The capital of France is"
    alone = client.completions.create(model="smollm2-135m", prompt=second, **GREEDY).choices[0].text
    reply = client.completions.create(model="smollm2-135m", prompt=[item["raw_prompt"], second], n=2, **GREEDY)
    assert [c.index for c in reply.choices] == [0, 1, 2, 3]  # choice i answers prompt i // n
    assert [c.text for c in reply.choices] == [item["greedy_text"]] * 2 + [alone] * 2
    assert reply.usage.completion_tokens == 4 * 48
    echoed = client.completions.create(model="smollm2-135m", prompt=[second, item["raw_prompt"]], echo=True,
                                       max_tokens=2, temperature=0)
    assert [c.text[:len(p)] for c, p in zip(echoed.choices, [second, item["raw_prompt"]])] == [
        second, item["raw_prompt"]]
    too_many = requests.post(f"{gen_server.url}/v1/chat/completions", timeout=30, json={
        "model": "smollm2-135m", "messages": item.get("messages") or [{"role": "user", "content": "hi"}], "n": 17})
    assert too_many.status_code == 400, too_many.text
    assert too_many.json()["error"]["param"] == "n" and "at most 16" in too_many.json()["error"]["message"]
