"""Structured output through the engine and the APIs: `parameters.json_schema` / `parameters.regex`
on /infer, OpenAI `response_format`, the Python client and the CLI. A constrained row's text
validates (jsonschema / re.fullmatch) or it finishes with "length"; constrained rows share the batch
with free rows of other tasks and every row decodes as it does alone (greedy, fp32); a bad or
hostile constraint is a 422 naming the problem, and the server stays ready."""

from __future__ import annotations

import json
import re

import httpx
import jsonschema
import pytest
from fastapi.testclient import TestClient

from modules.core.batch import Contribution
from modules.core.constraint import Constraint, ConstraintError, grammars_for
from modules.core.decode import GenItem, Sampling
from modules.core.running import generate
from modules.kinds.base import NoModule
from modules.registry import kind_class
from service.app import create_app
from service.config import Settings
from tests.test_batching import _modules, _rows

BOOL = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
        "additionalProperties": False}
COLOR = {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue", "cyan", "magenta"]}},
         "required": ["color"], "additionalProperties": False}
DIGITS = "[0-9]{3}"
TOL = 1e-5


def _valid(text: str, finish: str, schema: dict | None = None, regex: str | None = None) -> None:
    """The text matches its constraint, unless the row ran out of tokens."""
    if finish == "length":
        return
    assert finish == "stop", finish
    if schema is not None:
        jsonschema.validate(json.loads(text), schema)
    else:
        assert re.fullmatch(regex, text), text


def _grammar(bb, schema=None, regex=None):
    g = grammars_for(bb)
    return g.compile(Constraint.json_schema(schema) if schema is not None else Constraint.regex(regex))


# --- the engine -----------------------------------------------------------------------------------


def test_constrained_rows_batched_with_free_rows_of_other_tasks_decode_as_alone(tiny):
    """Constrained rows (a schema, a regex) of the base model, a soft prompt, a LoRA and a prefix
    share the running batch with free rows of other tasks: every row's tokens and logprobs are
    those it gets alone, the free rows are untouched by the masks, the constrained rows parse."""
    mods = _modules(tiny)
    chosen = [mods[0], mods[2], mods[4], mods[6]]  # base, prompt(4), lora, prefix(3)
    texts = ["the quick brown fox", "hello there", "zz", "a longer input text"]
    rows = _rows(tiny, [(m, t) for m in chosen for t in texts[:2]])
    bool_g, digits_g = _grammar(tiny, BOOL), _grammar(tiny, regex=DIGITS)
    items, wants = [], []
    for i, r in enumerate(rows):
        kind = i % 3  # free, schema, regex
        grammar = [None, bool_g, digits_g][kind]
        items.append(GenItem(r.ids, r.contribution, Sampling(max_new_tokens=16, grammar=grammar, logprobs=2)))
        wants.append([None, (BOOL, None), (None, DIGITS)][kind])
    together = generate(tiny, items)
    alone = [generate(tiny, [it])[0] for it in items]
    for it, g, a, want in zip(items, together, alone, wants):
        assert g.token_ids == a.token_ids and g.text == a.text and g.finish_reason == a.finish_reason
        assert max(abs(x.logprob - y.logprob) for x, y in zip(g.logprobs, a.logprobs)) <= TOL
        if want is not None:
            _valid(g.text, g.finish_reason, *want)
    constrained = [g for g, w in zip(together, wants) if w is not None]
    assert sum(g.finish_reason == "stop" for g in constrained) >= len(constrained) - 1  # they do finish
    free = [g for g, w in zip(together, wants) if w is None]
    assert all(g.finish_reason == "length" and len(g.token_ids) == 16 for g in free)  # a random model never stops


def test_a_constrained_row_keeps_the_models_logprobs_and_ignores_stop_strings(tiny):
    """Logprobs are the model's distribution before the mask: a constrained row's first step has
    the same alternatives as the free row of the same prompt. A stop string that the JSON contains
    does not cut it."""
    ids = NoModule(tiny).encode("hello there")
    free = generate(tiny, [GenItem(ids, Contribution(), Sampling(max_new_tokens=4, logprobs=5))])[0]
    stop = ['"', "{", "ok"]
    got = generate(tiny, [GenItem(ids, Contribution(), Sampling(max_new_tokens=30, logprobs=5, stop=stop,
                                                                grammar=_grammar(tiny, BOOL)))])[0]
    assert got.finish_reason == "stop" and got.text.startswith('{"ok": ')
    jsonschema.validate(json.loads(got.text), BOOL)
    first, free_first = got.logprobs[0], free.logprobs[0]
    assert [a.id for a in first.top] == [a.id for a in free_first.top]
    assert all(abs(a.logprob - b.logprob) <= TOL for a, b in zip(first.top, free_first.top))
    assert first.text == "{" and first.logprob < -1.0  # the model's own (random) odds, not the mask's 0
    assert len(got.logprobs) == len(got.token_ids)


def test_a_constrained_row_that_runs_out_of_tokens_finishes_with_length(tiny):
    ids = NoModule(tiny).encode("hello there")
    got = generate(tiny, [GenItem(ids, Contribution(), Sampling(max_new_tokens=4, grammar=_grammar(tiny, BOOL)))])[0]
    assert got.finish_reason == "length" and got.text == '{"ok'


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_n_samples_of_a_constrained_prompt_each_parse_and_equal_their_single_runs(tiny, temperature):
    ids = NoModule(tiny).encode("pick a color")
    sampling = Sampling(max_new_tokens=24, temperature=temperature, seed=7, grammar=_grammar(tiny, COLOR))
    c = Contribution()
    samples = generate(tiny, [[GenItem(ids, c, sampling.for_sample(i)) for i in range(6)]])[0]
    for i, s in enumerate(samples):
        _valid(s.text, s.finish_reason, COLOR)
        assert s.finish_reason == "stop"
        single = generate(tiny, [GenItem(ids, Contribution(), sampling.for_sample(i))])[0]
        assert single.token_ids == s.token_ids
    if temperature:  # each sample follows its own matcher: they differ
        assert len({s.text for s in samples}) > 1


def test_a_row_whose_grammar_fails_fails_alone(tiny, monkeypatch):
    """A matcher that cannot go on fails its row with an error; the other rows of the batch finish."""
    ids = NoModule(tiny).encode("hello")
    broken = _grammar(tiny, regex="[a-c]{5}")
    make = broken.matcher

    def refuse(tok):
        raise ConstraintError("boom")

    def failing():
        m = make()
        m.advance = refuse
        return m

    monkeypatch.setattr(broken, "matcher", failing)
    bad = GenItem(ids, Contribution(), Sampling(max_new_tokens=8, grammar=broken))
    good = GenItem(ids, Contribution(), Sampling(max_new_tokens=8, grammar=_grammar(tiny, regex=DIGITS)))
    free = GenItem(ids, Contribution(), Sampling(max_new_tokens=8))
    b, g, f = generate(tiny, [bad, good, free])
    assert b.finish_reason == "error" and "boom" in str(b.error)
    assert g.finish_reason == "stop" and re.fullmatch(DIGITS, g.text)
    assert f.finish_reason == "length" and f.token_ids == generate(tiny, [free])[0].token_ids


# --- /infer in-process ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def app_client(tmp_path_factory, tiny):
    settings = Settings(store_dir=tmp_path_factory.mktemp("store"), examples=False, max_input_tokens=64,
                        max_new_tokens=32, _env_file=None)
    with TestClient(create_app(settings, backbone=tiny, wait_ready=True)) as client:
        labels = kind_class("prompt").new(tiny, {"num_virtual_tokens": 2}, labels={"a": " a", "b": " b"})
        assert client.put("/tasks/cls", content=labels.to_artifact()).status_code == 201
        soft = kind_class("prompt").new(tiny, {"num_virtual_tokens": 3, "seed": 4}, template="Q: {input}\nA:")
        assert client.put("/tasks/soft", content=soft.to_artifact()).status_code == 201
        yield client


def _infer(client, task, inputs, **params):
    r = client.post(f"/tasks/{task}/infer", json={"inputs": inputs, "parameters": params})
    assert r.status_code == 200, r.text
    return r.json()["outputs"]


def test_infer_json_schema_and_regex_match_and_equal_the_engine_alone(app_client, tiny):
    texts = ["hello", "a longer input", "zz top"]
    for params, want in (({"json_schema": COLOR}, (COLOR, None)), ({"regex": DIGITS}, (None, DIGITS))):
        outs = _infer(app_client, "base", texts, max_new_tokens=24, **params)
        grammar = _grammar(tiny, *want)
        for text, out in zip(texts, outs):
            _valid(out["text"], out["finish_reason"], *want)
            ref = generate(tiny, [GenItem(NoModule(tiny).encode(text), Contribution(),
                                          Sampling(max_new_tokens=24, grammar=grammar))])[0]
            assert (out["text"], out["finish_reason"]) == (ref.text, ref.finish_reason)
    out = _infer(app_client, "soft", "is it?", max_new_tokens=24, json_schema=BOOL, temperature=0.9, seed=3, n=4)
    assert len(out) == 4
    for o in out:
        _valid(o["text"], o["finish_reason"], BOOL)


def test_infer_streams_a_constrained_answer(app_client):
    body = {"inputs": "stream it", "parameters": {"max_new_tokens": 24, "json_schema": COLOR}, "stream": True}
    pieces, done = [], None
    with app_client.stream("POST", "/tasks/base/infer", json=body) as r:
        assert r.status_code == 200
        from tests.test_continuous_http import sse_events

        for event, data in sse_events(r):
            if event == "done":
                done = json.loads(data)["outputs"][0]
            else:
                pieces.append(json.loads(data)["text"])
    assert done is not None and "".join(pieces) == done["text"] and len(pieces) > 1
    _valid(done["text"], done["finish_reason"], COLOR)


@pytest.mark.parametrize("task, params, code, message", [
    ("base", {"json_schema": BOOL, "regex": DIGITS}, "invalid_parameters", "json_schema and regex"),
    ("cls", {"json_schema": BOOL}, "invalid_parameters", "json_schema: this request is answered by scoring"),
    ("cls", {"regex": DIGITS}, "invalid_parameters", "regex: this request is answered by scoring"),
    ("base", {"regex": DIGITS, "choices": [" yes", " no"]}, "invalid_parameters", "regex: this request is answered"),
    ("base", {"json_schema": {"type": "foo"}}, "invalid_parameters", "json_schema: the json_schema cannot be compiled"),
    ("base", {"json_schema": {"type": "array", "uniqueItems": True}}, "invalid_parameters", "uniqueItems"),
    ("base", {"regex": "[z-a]"}, "invalid_parameters", 'invalid regex "[z-a]": invalid character class range'),
    ("base", {"regex": r"(a)\1"}, "invalid_parameters", "backreferences are not supported"),
    ("base", {"regex": ""}, "invalid_request", "parameters.regex"),
    ("base", {"json_schema": "yes"}, "invalid_request", "parameters.json_schema"),
])
def test_a_bad_constraint_is_422_naming_the_problem(app_client, task, params, code, message):
    r = app_client.post(f"/tasks/{task}/infer", json={"inputs": "x", "parameters": params})
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["code"] == code and message in err["message"], err


def test_a_hostile_constraint_is_422_and_the_server_stays_ready(app_client):
    huge = {"enum": [f"value-{i:06d}-" + "x" * 40 for i in range(2000)]}  # ~100 KB
    deep = {"type": "integer"}
    for _ in range(300):
        deep = {"type": "array", "items": deep}
    wide = {"type": "object", "properties": {f"p{i}": {"type": "string", "pattern": "(a|b)*a(a|b){12}"}
                                             for i in range(40)}, "required": [f"p{i}" for i in range(40)]}
    for params, message in (({"json_schema": huge}, "bytes as JSON; the limit is"),
                            ({"json_schema": deep}, "recursion limit"),
                            ({"regex": "(" * 2000 + "a" + ")" * 2000}, "regex: the regex cannot be compiled: invalid regex"),
                            ({"regex": "x" * 5000}, "parameters.regex")):
        r = app_client.post("/tasks/base/infer", json={"inputs": "x", "parameters": params})
        assert r.status_code == 422, r.text[:500]
        assert message in r.json()["error"]["message"]
    # a large but legal grammar compiles (or is refused by the engine's limits), never a 500
    r = app_client.post("/tasks/base/infer", json={"inputs": "x", "parameters": {"json_schema": wide, "max_new_tokens": 3}})
    assert r.status_code in (200, 422), r.text[:500]
    assert app_client.get("/readyz").status_code == 200
    _valid(_infer(app_client, "base", "x", max_new_tokens=8, regex=DIGITS)[0]["text"], "stop", regex=DIGITS)


def test_openai_response_format_in_process(app_client):
    """Shapes the openai package sends, checked here; the package itself runs against a real server below."""
    msgs = [{"role": "user", "content": "a color?"}]
    fmt = {"type": "json_schema", "json_schema": {"name": "color", "schema": COLOR, "strict": True}}
    r = app_client.post("/v1/chat/completions", json={"model": "base", "messages": msgs, "max_tokens": 24,
                                                      "response_format": fmt})
    assert r.status_code == 200, r.text
    jsonschema.validate(json.loads(r.json()["choices"][0]["message"]["content"]), COLOR)
    r = app_client.post("/v1/completions", json={"model": "base", "prompt": "x", "max_tokens": 24,
                                                 "response_format": {"type": "json_object"}})
    text = r.json()["choices"][0]["text"]
    if r.json()["choices"][0]["finish_reason"] == "stop":
        assert isinstance(json.loads(text), dict)
    else:
        assert text.startswith("{")
    plain = app_client.post("/v1/completions", json={"model": "base", "prompt": "x", "max_tokens": 5,
                                                     "response_format": {"type": "text"}})
    free = app_client.post("/v1/completions", json={"model": "base", "prompt": "x", "max_tokens": 5})
    assert plain.json()["choices"][0]["text"] == free.json()["choices"][0]["text"]
    for bad, message in (({"type": "json_schema"}, "response_format"),
                         ({"type": "xml"}, "response_format.type"),
                         ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "foo"}}},
                          "Invalid type: foo")):
        r = app_client.post("/v1/chat/completions", json={"model": "base", "messages": msgs, "response_format": bad})
        assert r.status_code == 422 and message in r.json()["error"]["message"], r.text


# --- a real server: the openai package, the client, the CLI ---------------------------------------


@pytest.fixture(scope="module")
def served_tiny(tiny_served, tmp_path_factory):
    from tests.adversary import served

    env = {"FROZENLM_BACKBONE": str(tiny_served[0]), "FROZENLM_EXAMPLES": "false", "FROZENLM_DEVICE": "cpu",
           "FROZENLM_THREADS": "1"}
    with served(env, tmp_path_factory.mktemp("structured-store")) as s:
        yield s.url


def test_the_openai_package_sends_response_format_streamed_and_not(served_tiny):
    from openai import OpenAI

    client = OpenAI(base_url=f"{served_tiny}/v1", api_key="none", max_retries=0)
    msgs = [{"role": "user", "content": "a color, please"}]
    fmt = {"type": "json_schema", "json_schema": {"name": "color", "schema": COLOR, "strict": True}}
    chat = client.chat.completions.create(model="base", messages=msgs, max_tokens=24, response_format=fmt)
    text = chat.choices[0].message.content
    assert chat.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(text), COLOR)
    stream = client.chat.completions.create(model="base", messages=msgs, max_tokens=24, response_format=fmt,
                                            stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
    assert chunks[-1].choices[0].finish_reason == "stop"

    done = client.completions.create(model="base", prompt="three digits:", max_tokens=8,
                                     extra_body={"response_format": {"type": "json_object"}})
    if done.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(done.choices[0].text), dict)
    sampled = client.chat.completions.create(model="base", messages=msgs, max_tokens=24, n=3, temperature=1.0,
                                             seed=2, response_format=fmt)
    assert len(sampled.choices) == 3
    for c in sampled.choices:
        jsonschema.validate(json.loads(c.message.content), COLOR)
    from openai import UnprocessableEntityError

    with pytest.raises(UnprocessableEntityError, match="uniqueItems"):
        client.chat.completions.create(model="base", messages=msgs, response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "array", "uniqueItems": True}}})


def test_the_client_and_the_cli_take_json_schema_and_regex(served_tiny, capsys, tmp_path):
    from clients import Client
    from clients.cli import main as cli
    from clients.client import FrozenLMError

    with Client(served_tiny) as c:
        out = c.infer("base", ["hello", "there"], max_new_tokens=24, json_schema=COLOR).outputs
        for o in out:
            _valid(o.text, o.finish_reason, COLOR)
        assert re.fullmatch(DIGITS, c.infer("base", "hi", regex=DIGITS, max_new_tokens=8).outputs[0].text)
        with pytest.raises(FrozenLMError) as e:
            c.infer("base", "hi", regex="[z-a]")
        assert e.value.status == 422 and "invalid character class range" in e.value.message
    path = tmp_path / "schema.json"
    path.write_text(json.dumps(COLOR))
    for schema in (json.dumps(COLOR), f"@{path}"):
        assert cli(["--url", served_tiny, "infer", "base", "hello", "--max-new-tokens", "24",
                    "--json-schema", schema]) == 0
        jsonschema.validate(json.loads(capsys.readouterr().out.strip()), COLOR)
    assert cli(["--url", served_tiny, "infer", "base", "hello", "--regex", DIGITS]) == 0
    assert re.fullmatch(DIGITS, capsys.readouterr().out.strip())
    assert cli(["--url", served_tiny, "infer", "base", "hello", "--json-schema", "{not json"]) == 2
    assert "--json-schema is not JSON" in capsys.readouterr().err
    assert cli(["--url", served_tiny, "infer", "base", "hello", "--json-schema", '{"type": "foo"}']) == 1
    assert "Invalid type: foo" in capsys.readouterr().err


def test_the_static_engine_answers_the_same_constrained_text(served_tiny, tiny_served, tmp_path):
    from tests.adversary import served

    body = {"inputs": ["hello", "zz top"], "parameters": {"max_new_tokens": 24, "json_schema": COLOR,
                                                          "temperature": 0.8, "seed": 5, "n": 2}}
    want = httpx.post(f"{served_tiny}/tasks/base/infer", json=body, timeout=60).json()["outputs"]
    env = {"FROZENLM_BACKBONE": str(tiny_served[0]), "FROZENLM_EXAMPLES": "false", "FROZENLM_DEVICE": "cpu",
           "FROZENLM_THREADS": "1", "FROZENLM_ENGINE": "static"}
    with served(env, tmp_path / "store") as s:
        got = httpx.post(f"{s.url}/tasks/base/infer", json=body, timeout=60).json()["outputs"]
    assert [(g["text"], g["finish_reason"]) for g in got] == [(w["text"], w["finish_reason"]) for w in want]
    for g in got:
        _valid(g["text"], g["finish_reason"], COLOR)


# --- the real backbone ----------------------------------------------------------------------------


@pytest.mark.integration
def test_real_server_chat_with_a_json_schema_response_format_validates(server):
    """SmolLM2 through a real server and the openai package: a chat answer in a schema with nested
    objects, an enum, an integer range and an array validates."""
    from openai import OpenAI

    from tests.conftest import INTEGRATION_ADMIN_KEY

    schema = {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 40},
        "country": {"enum": ["France", "Germany", "Italy", "Spain"]},
        "population_millions": {"type": "integer", "minimum": 0, "maximum": 50},
        "landmarks": {"type": "array", "items": {"type": "string", "maxLength": 40}, "minItems": 1, "maxItems": 3}},
        "required": ["city", "country", "population_millions", "landmarks"], "additionalProperties": False}
    client = OpenAI(base_url=f"{server[0]}/v1", api_key=INTEGRATION_ADMIN_KEY, max_retries=0, timeout=300)
    chat = client.chat.completions.create(
        model="base", max_tokens=120, response_format={"type": "json_schema",
                                                       "json_schema": {"name": "city", "schema": schema, "strict": True}},
        messages=[{"role": "user", "content": "Describe Paris as JSON: city, country, population, landmarks."}])
    choice = chat.choices[0]
    assert choice.finish_reason == "stop", choice.message.content
    answer = json.loads(choice.message.content)
    jsonschema.validate(answer, schema)
    assert answer["country"] == "France"

