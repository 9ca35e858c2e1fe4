"""The OpenAI-compatible API (issue 19): the official `openai` client against a real agent serving
the example tiny-lm, and the pure parts (request validation, stop sequences) exactly."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import openai
import pytest
from agent_runner import RunningAgent

from node_agent.agent import AgentSettings
from node_agent.cli import main as agent_cli
from node_agent.errors import InvalidInput
from node_agent.serving.http import HttpSettings
from node_agent.serving.openai_api import ChatMessage, StopMatcher, default_chat_prompt, parse_request

pytestmark = pytest.mark.usefixtures("one_torch_thread")
GREEDY = {"temperature": 0, "max_tokens": 24}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningAgent]:
    root = tmp_path_factory.mktemp("openai") / "models"
    assert agent_cli(["make-examples", str(root)]) == 0
    running = RunningAgent(AgentSettings(root, workers=1, http=HttpSettings(host="127.0.0.1", port=0)))
    yield running
    running.close()


@pytest.fixture(scope="module")
def client(served: RunningAgent) -> Iterator[openai.OpenAI]:
    c = openai.OpenAI(base_url=f"http://{served.url}/v1", api_key="unused", max_retries=0, timeout=60)
    yield c
    c.close()


def v2_generate(served: RunningAgent, text: str, **parameters: Any) -> dict[str, Any]:
    body = json.dumps({"text_input": text, "parameters": parameters}).encode()
    request = urllib.request.Request(f"http://{served.url}/v2/models/tiny-lm/generate", body, method="POST")
    with urllib.request.urlopen(request, timeout=60) as r:
        return dict(json.load(r))


# --- the official client against a real agent -------------------------------------------------


def test_models_lists_the_models_that_generate(client: openai.OpenAI) -> None:
    ids = {m.id for m in client.models.list()}
    assert {"tiny-lm", "tiny-lm:1"} <= ids
    assert "classifier" not in ids  # a model that does not generate


def test_completion_equals_the_v2_generate_output_with_usage(
    client: openai.OpenAI, served: RunningAgent
) -> None:
    done = client.completions.create(model="tiny-lm", prompt="The edge is", **GREEDY)
    v2 = v2_generate(served, "The edge is", **GREEDY)
    choice = done.choices[0]
    assert choice.text == v2["text_output"] and choice.finish_reason == v2["finish_reason"]
    assert done.object == "text_completion" and done.id.startswith("cmpl-")
    assert done.usage is not None
    assert (done.usage.prompt_tokens, done.usage.completion_tokens) == (
        v2["prompt_tokens"],
        v2["completion_tokens"],
    )
    assert done.usage.total_tokens == done.usage.prompt_tokens + done.usage.completion_tokens


def test_streamed_completion_equals_the_whole_one(client: openai.OpenAI) -> None:
    whole = client.completions.create(model="tiny-lm:1", prompt="Stream me", **GREEDY)
    chunks = list(
        client.completions.create(
            model="tiny-lm:1",
            prompt="Stream me",
            stream=True,
            stream_options={"include_usage": True},
            **GREEDY,
        )
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert reasons == [whole.choices[0].finish_reason]
    assert (
        chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    )


def test_chat_completion_whole_and_streamed_with_a_seed(client: openai.OpenAI, served: RunningAgent) -> None:
    messages: list[Any] = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Say hello."},
    ]
    sampled = {"temperature": 0.8, "top_p": 0.9, "seed": 7, "max_tokens": 20}
    first = client.chat.completions.create(model="tiny-lm", messages=messages, **sampled)
    again = client.chat.completions.create(model="tiny-lm", messages=messages, **sampled)
    assert first.choices[0].message.role == "assistant"
    assert first.choices[0].message.content == again.choices[0].message.content  # same seed, same tokens
    # The model has no chat template of its own: the default one, as the v2 API would see it.
    prompt = default_chat_prompt([ChatMessage(m["role"], m["content"]) for m in messages])
    assert first.choices[0].message.content == v2_generate(served, prompt, **sampled)["text_output"]
    stream = client.chat.completions.create(model="tiny-lm", messages=messages, stream=True, **sampled)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == first.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == first.choices[0].finish_reason


def test_a_stop_sequence_ends_the_output_before_it(client: openai.OpenAI) -> None:
    free = client.completions.create(model="tiny-lm", prompt="abc", **GREEDY).choices[0].text
    assert len(free) >= 6, free
    stop = free[3:5]  # two characters from inside the free output
    cut = client.completions.create(model="tiny-lm", prompt="abc", stop=[stop], **GREEDY)
    assert cut.choices[0].text == free[: free.index(stop)] and cut.choices[0].finish_reason == "stop"
    assert cut.usage is not None and cut.usage.completion_tokens < 24
    streamed = client.completions.create(model="tiny-lm", prompt="abc", stop=stop, stream=True, **GREEDY)
    assert "".join(c.choices[0].text for c in streamed) == cut.choices[0].text


def test_errors_have_openais_shape_and_the_clients_exceptions(
    client: openai.OpenAI, served: RunningAgent
) -> None:
    with pytest.raises(openai.NotFoundError) as missing:
        client.completions.create(model="no-such-model", prompt="x", max_tokens=4)
    assert missing.value.body["code"] == "model_not_found"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as wrong_task:
        client.completions.create(model="classifier", prompt="x", max_tokens=4)
    assert "does not generate" in wrong_task.value.message
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model="tiny-lm", prompt="x", temperature=-1)
    with pytest.raises(openai.BadRequestError, match="'n' must be 1"):
        client.chat.completions.create(model="tiny-lm", messages=[{"role": "user", "content": "x"}], n=2)
    # Not JSON at all: the same shape, no stack trace.
    request = urllib.request.Request(f"http://{served.url}/v1/completions", b"{nope", method="POST")
    with pytest.raises(urllib.error.HTTPError) as raw:
        urllib.request.urlopen(request, timeout=30)
    body = json.load(raw.value)
    assert raw.value.code == 400 and set(body["error"]) == {"message", "type", "param", "code"}


# --- pure parts -------------------------------------------------------------------------------


def test_stop_matcher_holds_back_only_what_may_begin_a_stop() -> None:
    m = StopMatcher(["END", "##"])
    assert m.feed("hello E") == ("hello ", False)  # "E" may begin END
    assert m.feed("N") == ("", False)  # "EN" still may
    assert m.feed("X") == ("ENX", False)  # it did not
    assert m.feed("a#") == ("a", False)
    assert m.feed("#tail") == ("", True)  # "##" found: nothing after it, nothing before is left
    tail = StopMatcher(["END"])
    assert tail.feed("done E") == ("done ", False) and tail.flush() == "E"
    assert StopMatcher([]).feed("anything") == ("anything", False)
    assert StopMatcher(["b", "abc"]).feed("xabc") == ("x", True)  # the stop that starts first wins


@pytest.mark.parametrize(
    ("doc", "why"),
    [
        ({"prompt": "x"}, "'model'"),
        ({"model": "m"}, "'prompt'"),
        ({"model": "m", "prompt": ["a", "b"]}, "'prompt'"),
        ({"model": "m", "prompt": "x", "stop": ["a"] * 5}, "at most 4"),
        ({"model": "m", "prompt": "x", "stop": [""]}, "'stop'"),
        ({"model": "m", "prompt": "x", "logprobs": 2}, "'logprobs'"),
        ({"model": "m", "prompt": "x", "presence_penalty": 0.5}, "presence_penalty"),
        ({"model": "m", "prompt": "x", "stream": "yes"}, "'stream'"),
        ({"model": "m", "prompt": "x", "max_tokens": 0}, "max_tokens"),
    ],
)
def test_bad_completion_requests_name_the_field(doc: dict[str, Any], why: str) -> None:
    with pytest.raises(InvalidInput, match=why):
        parse_request(doc, chat=False)


def test_chat_requests_validate_messages_and_take_max_completion_tokens() -> None:
    ok = parse_request(
        {"model": "m:2", "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
         "max_completion_tokens": 7, "max_tokens": 3},
        chat=True,
    )  # fmt: skip
    assert (ok.model, ok.version, ok.messages, ok.params.max_tokens) == (
        "m",
        "2",
        (ChatMessage("user", "hi"),),
        7,
    )
    for bad in ([], [{"role": "wizard", "content": "x"}], [{"role": "user", "content": 3}],
                [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]):  # fmt: skip
        with pytest.raises(InvalidInput, match="messages"):
            parse_request({"model": "m", "messages": bad}, chat=True)
