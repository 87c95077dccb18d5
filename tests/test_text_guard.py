"""The lone-surrogate guard: which strings it refuses, and that it passes every other body on."""

from __future__ import annotations

import json

import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient

from vllm_twotower.engine.text_guard import RefuseUnencodableText, unencodable_field


@pytest.fixture(scope="module")
def client() -> TestClient:
    app = FastAPI()

    @app.post("/echo")
    async def echo(request: Request) -> dict:
        return {"body": (await request.body()).decode()}

    app.add_middleware(RefuseUnencodableText)
    return TestClient(app)


@pytest.mark.parametrize(
    ("value", "field"),
    [
        ({"prompt": "ok \ud800"}, "prompt"),
        ({"prompt": ["fine", "bad \udfff"]}, "prompt[1]"),
        ({"messages": [{"role": "user", "content": "\ud83d"}]}, "messages[0].content"),
        ({"vllm_xargs": {"\ud800": 1}}, "vllm_xargs"),
        ({"bad_words": ["a", "b\udc00"]}, "bad_words[1]"),
    ],
)
def test_the_first_unencodable_string_is_named(value: object, field: str) -> None:
    assert unencodable_field(value) == field


@pytest.mark.parametrize("value", [{"prompt": "😀 é \u2028"}, {"prompt": [1, 2]}, [], "x", 3])
def test_valid_text_passes(value: object) -> None:
    assert unencodable_field(value) is None


def test_a_lone_surrogate_gets_400_naming_the_field(client: TestClient) -> None:
    body = json.dumps({"model": "m", "prompt": "ok \ud800 there"})  # ASCII, with a \u escape
    response = client.post("/echo", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "prompt" and "surrogate" in error["message"]
    assert error["type"] == "BadRequestError" and error["code"] == 400


@pytest.mark.parametrize(
    "body",
    [
        json.dumps({"prompt": "paired \ud83d\ude00 and escaped \u00e9"}),
        json.dumps({"prompt": "😀"}, ensure_ascii=False),
        "not json \\u at all",
        "",
    ],
)
def test_other_bodies_reach_the_app_unchanged(client: TestClient, body: str) -> None:
    response = client.post("/echo", content=body.encode())
    assert response.status_code == 200
    assert response.json()["body"] == body
