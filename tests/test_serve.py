"""`lorart serve` through a real HTTP client on loopback (the `openai` client, httpx): per-request greedy output
equal to single-request generation whatever else is in the batch (base + two adapters with different targets,
dense and NF4 bases, SmolLM2), streaming, stop strings, seeds, adapter load/unload/LRU, 200 concurrent requests."""
from __future__ import annotations

import asyncio
import json
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

sys.path.insert(0, os.path.dirname(__file__))
from serve_helpers import make_adapters, make_engine, metric_value, Paused, reference_model  # noqa: E402
from serve_helpers import reference_text, Server, wait_until  # noqa: E402
from serve_helpers import one_thread, tiny  # noqa: E402,F401 - fixtures: one intra-op thread (autouse);
#   the tiny model and its two adapters (once per module)

from lorart.inject import lora_layers  # noqa: E402
from lorart.models import load_model  # noqa: E402
from lorart.serving.engine import Engine  # noqa: E402

PROMPTS = ["What is the capital of France?", "Hello there", "A longer prompt about cats and dogs and birds."]


def _chat_ids(tok, text):
    return tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True)


@pytest.mark.parametrize("quantize", [False, True], ids=["dense", "nf4"])
def test_mixed_batch_greedy_equals_generate(tiny, quantize):
    """Base + two adapters (different target layers), completions and chat, all in one batch: each answer is what
    single-request greedy generation gives for its model."""
    model_dir, ads = tiny
    eng, tok = make_engine(model_dir, ads, quantize, max_batch=32)
    jobs = [(model, kind, p) for model in (None, "alpha", "beta") for kind in ("completion", "chat") for p in PROMPTS]
    with Server(eng) as srv:
        client = srv.client()

        def ask(job):
            model, kind, p = job
            name = model or "tiny"
            if kind == "chat":
                r = client.chat.completions.create(model=name, messages=[{"role": "user", "content": p}],
                                                   max_tokens=12, temperature=0)
                return r, r.choices[0].message.content
            r = client.completions.create(model=name, prompt=p, max_tokens=12, temperature=0)
            return r, r.choices[0].text

        with ThreadPoolExecutor(len(jobs)) as pool:
            with Paused(eng):  # everything is queued before the first step
                futs = [pool.submit(ask, j) for j in jobs]
                wait_until(lambda: eng.load_info()["waiting"] == len(jobs))
            results = [f.result() for f in futs]
    steps = metric_value(eng, "lorart_batch_size_count")
    assert steps >= 12 and steps - metric_value(eng, "lorart_batch_size_bucket", le="16.0") >= 1  # all 18 in one step
    for (model, kind, p), (resp, text) in zip(jobs, results):
        ids = _chat_ids(tok, p) if kind == "chat" else tok.encode(p)
        assert resp.model == (model or "tiny")
        assert resp.usage.prompt_tokens == len(ids)
        assert text == reference_text(model_dir, ads.get(model), ids, 12, quantize), (model, kind, p)
    assert len({t for _, t in results}) > len(PROMPTS) * 2  # the adapters change the answers


def test_streaming_stop_strings_and_usage(tiny):
    model_dir, ads = tiny
    eng, tok = make_engine(model_dir, ads)
    with Server(eng) as srv:
        c = srv.client()
        full = c.completions.create(model="beta", prompt=PROMPTS[0], max_tokens=24, temperature=0)
        text = full.choices[0].text
        assert full.choices[0].finish_reason == "length" and full.usage.completion_tokens == 24
        chunks = list(c.completions.create(model="beta", prompt=PROMPTS[0], max_tokens=24, temperature=0,
                                           stream=True, stream_options={"include_usage": True}))
        assert len(chunks) > 3
        assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == text
        assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 24
        # a stop string from the middle of that text: cut before it, streamed or not
        i = next(i for i in range(4, len(text) - 2) if "\ufffd" not in text[i:i + 2])
        stop = text[i:i + 2]
        cut = text[:text.index(stop)]
        r = c.completions.create(model="beta", prompt=PROMPTS[0], max_tokens=24, temperature=0, stop=[stop, "zzzz"])
        assert r.choices[0].text == cut and r.choices[0].finish_reason == "stop"
        assert r.choices[0].model_extra["stop_reason"] == stop
        s = c.completions.create(model="beta", prompt=PROMPTS[0], max_tokens=24, temperature=0, stop=stop,
                                 stream=True)
        assert "".join(ch.choices[0].text for ch in s) == cut
        # chat streaming: a role chunk, content deltas, a finish chunk, then [DONE] (raw SSE)
        with httpx.stream("POST", srv.url + "/v1/chat/completions", timeout=60,
                          json={"model": "alpha", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6,
                                "temperature": 0, "stream": True}) as resp:
            assert resp.headers["content-type"].startswith("text/event-stream")
            events = [line[6:] for line in resp.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        body = [json.loads(e) for e in events[:-1]]
        assert body[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        assert body[-1]["choices"][0]["finish_reason"] == "length" and body[-1]["object"] == "chat.completion.chunk"
        streamed = "".join(b["choices"][0]["delta"].get("content", "") for b in body)
        ref = reference_text(model_dir, ads["alpha"], _chat_ids(tok, "hi"), 6)
        assert streamed == ref


def test_a_list_of_prompts_gives_one_choice_each(tiny):
    """`prompt` as a list of strings or of token-id lists: choice i answers prompt i, plain and streamed (chunks
    carry their choice's index), usage sums them."""
    model_dir, ads = tiny
    eng, tok = make_engine(model_dir, ads)
    ids = [tok.encode(p) for p in PROMPTS]
    want = [reference_text(model_dir, ads["beta"], i, 7) for i in ids]
    with Server(eng) as srv:
        c = srv.client()
        for prompt in (PROMPTS, ids):
            r = c.completions.create(model="beta", prompt=prompt, max_tokens=7, temperature=0)
            assert [ch.index for ch in r.choices] == [0, 1, 2] and [ch.text for ch in r.choices] == want
            assert r.usage.prompt_tokens == sum(map(len, ids))
        parts = {}
        for ch in c.completions.create(model="beta", prompt=PROMPTS, max_tokens=7, temperature=0, stream=True):
            for choice in ch.choices:
                parts[choice.index] = parts.get(choice.index, "") + choice.text
        assert [parts[i] for i in range(3)] == want


def test_seeded_sampling_is_reproducible_in_any_batch(tiny):
    model_dir, ads = tiny
    eng, _ = make_engine(model_dir, ads)
    with Server(eng) as srv:
        c = srv.client()
        kw = dict(model="alpha", prompt=PROMPTS[1], max_tokens=16, temperature=1.0, top_p=0.9, seed=1234)
        alone = c.completions.create(**kw).choices[0].text
        with ThreadPoolExecutor(6) as pool:  # the same request again among others
            futs = [pool.submit(c.completions.create, **kw)] + [
                pool.submit(c.completions.create, model=m, prompt=p, max_tokens=16, temperature=0.7)
                for m in ("tiny", "beta") for p in PROMPTS[:2]]
            crowded = futs[0].result().choices[0].text
            [f.result() for f in futs]
        other = c.completions.create(**{**kw, "seed": 99}).choices[0].text
        negative = c.completions.create(**{**kw, "seed": -5}).choices[0].text
        # a temperature too small to divide by is greedy (not NaN probabilities failing the batch)
        tiny_t = c.completions.create(model="alpha", prompt=PROMPTS[1], max_tokens=8, temperature=1e-30)
        greedy = c.completions.create(model="alpha", prompt=PROMPTS[1], max_tokens=8, temperature=0)
    assert alone == crowded
    assert other != alone and negative
    assert tiny_t.choices[0].text == greedy.choices[0].text


def test_models_list_and_adapter_load_unload(tiny):
    model_dir, ads = tiny
    eng, tok = make_engine(model_dir, {"alpha": ads["alpha"]})
    with Server(eng, model_path=model_dir, allow_adapter_loading=True) as srv:
        c = srv.client()
        models = {m.id: m for m in c.models.list().data}
        assert set(models) == {"tiny", "alpha"}
        assert models["alpha"].model_extra["parent"] == "tiny" and models["alpha"].model_extra["root"] == ads["alpha"]
        assert models["tiny"].model_extra["root"] == model_dir
        r = httpx.post(srv.url + "/v1/load_lora_adapter", json={"lora_name": "org/gamma.v2", "lora_path": ads["beta"]})
        assert r.status_code == 200 and "added successfully" in r.text
        ids = tok.encode(PROMPTS[2])
        ref = reference_text(model_dir, ads["beta"], ids, 300)
        assert c.completions.create(model="org/gamma.v2", prompt=PROMPTS[2], max_tokens=8,
                                    temperature=0).choices[0].text == reference_text(model_dir, ads["beta"], ids, 8)
        # unload while a request uses the adapter: refused for new requests at once, done after the request
        stream = c.completions.create(model="org/gamma.v2", prompt=PROMPTS[2], max_tokens=300, temperature=0,
                                      stream=True)
        it = iter(stream)
        got = [next(it).choices[0].text]
        box = {}
        with Paused(eng):
            assert metric_value(eng, "lorart_generation_tokens_total", model="org/gamma.v2") < 8 + 300
            t = threading.Thread(target=lambda: box.update(r=httpx.post(
                srv.url + "/v1/unload_lora_adapter", json={"lora_name": "org/gamma.v2"}, timeout=60)))
            t.start()
            wait_until(lambda: eng.registry.get("org/gamma.v2").unloading)
            with pytest.raises(openai.NotFoundError, match="does not exist"):
                c.completions.create(model="org/gamma.v2", prompt="x", max_tokens=2)
            assert "org/gamma.v2" not in {m.id for m in c.models.list().data}
            time.sleep(0.2)
            assert "r" not in box  # waiting for the running request
        got += [ch.choices[0].text for ch in it]
        t.join(60)
        assert box["r"].status_code == 200 and "removed successfully" in box["r"].text
        assert "".join(got) == ref  # the running request was not disturbed
        assert sum(metric_value(eng, "lorart_requests_total", model="org/gamma.v2", outcome=o)
                   for o in ("length", "stop")) == 2
        assert all(len(m.adapter_names) == 1 for m in lora_layers(eng.model).values())  # alpha only
        assert httpx.post(srv.url + "/v1/unload_lora_adapter", json={"lora_name": "org/gamma.v2"}).status_code == 404
        # strict validation: a bad folder changes nothing
        bad = os.path.join(os.path.dirname(ads["beta"]), "pickled")
        os.makedirs(bad, exist_ok=True)
        with open(os.path.join(bad, "adapter_config.json"), "w") as f:
            json.dump({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}, f)
        open(os.path.join(bad, "adapter_model.bin"), "wb").close()
        for body, status, words in [({"lora_name": "x", "lora_path": bad}, 400, "pickle"),
                                    ({"lora_name": "x", "lora_path": "/nonexistent"}, 400, "no such adapter folder"),
                                    ({"lora_name": "alpha", "lora_path": ads["beta"]}, 400, "already been loaded"),
                                    ({"lora_name": "tiny", "lora_path": ads["beta"]}, 400, "base model"),
                                    ({"lora_name": "x", "lora_path": model_dir}, 400, "adapter_config.json"),
                                    ({"lora_name": "x"}, 400, "lora_path")]:
            r = httpx.post(srv.url + "/v1/load_lora_adapter", json=body)
            assert r.status_code == status and words in r.json()["error"]["message"], (body, r.text)
        assert {m.id for m in c.models.list().data} == {"tiny", "alpha"}


def test_adapter_loading_is_off_by_default(tiny):
    model_dir, ads = tiny
    eng, _ = make_engine(model_dir, {})
    with Server(eng) as srv:
        r = httpx.post(srv.url + "/v1/load_lora_adapter", json={"lora_name": "a", "lora_path": ads["alpha"]})
        assert r.status_code == 404 and r.json()["error"]["code"] == 404


def test_lru_bound_evicts_idle_adapters_and_outputs_stay_exact(tiny):
    model_dir, ads = tiny
    eng, tok = make_engine(model_dir, ads, max_adapters=1)
    jobs = [(m, p) for p in PROMPTS for m in ("alpha", "beta", "tiny")] * 2
    with Server(eng) as srv:
        c = srv.client()
        with ThreadPoolExecutor(len(jobs)) as pool:
            texts = list(pool.map(lambda j: c.completions.create(model=j[0], prompt=j[1], max_tokens=10,
                                                                 temperature=0).choices[0].text, jobs))
    for (m, p), t in zip(jobs, texts):
        assert t == reference_text(model_dir, ads.get(m), tok.encode(p), 10), (m, p)
    assert eng.registry.resident_count == 1
    assert len({k for layer in lora_layers(eng.model).values() for k in layer.adapter_names}) == 1
    assert metric_value(eng, "lorart_adapter_evictions_total") >= 1


def test_two_hundred_concurrent_requests(tiny):
    """No lost, duplicated or mixed-up responses: each of 200 concurrent requests (3 models, distinct prompts)
    gets its own answer."""
    model_dir, ads = tiny
    eng, tok = make_engine(model_dir, ads, max_batch=64, max_queued=256)
    models = ["tiny", "alpha", "beta"]
    jobs = [(models[i % 3], f"request number {i}: tell me about item {i * 7 % 13}") for i in range(200)]
    with Server(eng) as srv:
        async def run():
            client = openai.AsyncOpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=120,
                                        http_client=httpx.AsyncClient(limits=httpx.Limits(max_connections=256)))
            try:
                return await asyncio.gather(*[client.completions.create(model=m, prompt=p, max_tokens=6, temperature=0)
                                              for m, p in jobs])
            finally:
                await client.close()
        resps = asyncio.run(run())
    assert len({r.id for r in resps}) == 200
    for (m, p), r in zip(jobs, resps):
        ids = tok.encode(p)
        assert r.model == m and r.usage.prompt_tokens == len(ids)
        assert r.choices[0].text == reference_text(model_dir, ads.get(m), ids, 6), (m, p)
    assert sum(metric_value(eng, "lorart_requests_total", model="alpha", outcome=o) for o in ("length", "stop")) == 67


def test_smollm2_mixed_batch_equals_generate(tmp_path):
    """The embedded SmolLM2 with two random adapters (q/v and all-linear) and the base, in one batch."""
    from lorart.models import default_model_path
    try:
        default_model_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    m, tok = load_model("default")
    ads = make_adapters("default", str(tmp_path), names={"alpha": ["q_proj", "v_proj"], "beta": "all-linear"},
                        scale=0.02)
    eng = Engine(m, tok, base_name="smol")
    for n, p in ads.items():
        eng.registry.add(n, p)
    prompts = {"smol": "What is the capital of France?", "alpha": "List three colors.",
               "beta": "Write a haiku about the sea."}
    with Server(eng) as srv:
        c = srv.client()
        with ThreadPoolExecutor(3) as pool:
            with Paused(eng):
                futs = {k: pool.submit(c.chat.completions.create, model=k, max_tokens=12, temperature=0,
                                       messages=[{"role": "user", "content": p}]) for k, p in prompts.items()}
                wait_until(lambda: eng.load_info()["waiting"] == 3)
            got = {k: f.result().choices[0].message.content for k, f in futs.items()}
    del eng, m
    try:
        for k, p in prompts.items():
            assert got[k] == reference_text("default", ads.get(k), _chat_ids(tok, p), 12), k
    finally:
        reference_model.cache_clear()  # three SmolLM2 copies
    assert got["smol"].startswith("The capital of France is Paris")
