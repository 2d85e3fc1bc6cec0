"""The shared contracts: key layout, id validation, document parsing, message schemas."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from contracts import keys
from contracts.documents import DocumentError, parse_document
from contracts.export_schemas import PUBLIC_MODELS, SCHEMAS_DIR, render
from contracts.ids import InvalidIdentifier
from contracts.messages import TrainRequest


def test_key_layout_is_exactly_the_product_brief() -> None:
    assert keys.adapter_prefix("u1", "a1") == "users/u1/avatars/a1/adapters/"
    assert keys.training_data_prefix("u1", "a1") == "users/u1/avatars/a1/adapters/training_data/"
    assert keys.training_document_key("u1", "a1", "x.jsonl") == "users/u1/avatars/a1/adapters/training_data/x.jsonl"
    assert keys.adapter_version_prefix("u1", "a1", 3) == "users/u1/avatars/a1/adapters/versions/3/"


@pytest.mark.parametrize("bad", ["", "..", "a/b", "a\\b", ".x", "a\x00b", "x" * 129, "a b", "é"])
def test_ids_that_could_escape_a_prefix_are_refused(bad: str) -> None:
    with pytest.raises(InvalidIdentifier):
        keys.avatar_prefix("u1", bad)
    with pytest.raises(InvalidIdentifier):
        keys.user_prefix(bad)


def test_document_name_from_key_ignores_nested_and_foreign_keys() -> None:
    prefix = keys.training_data_prefix("u", "a")
    assert keys.document_name_from_key(prefix + "x.txt", prefix) == "x.txt"
    assert keys.document_name_from_key(prefix + "d/x.txt", prefix) is None
    assert keys.document_name_from_key("users/v/x.txt", prefix) is None


def test_every_format_becomes_chat() -> None:
    chat = parse_document(
        "c.jsonl",
        b'{"messages":[{"role":"system","content":"s"},{"role":"user","content":"u"},'
        b'{"role":"assistant","content":"a","weight":0},{"role":"assistant","content":"b"}]}\n',
    )
    assert [m.role for m in chat[0].messages] == ["system", "user", "assistant", "assistant"]
    assert chat[0].messages[2].weight == 0
    pc = parse_document("p.jsonl", b'{"prompt":"q","completion":"r"}\n\n{"text":"t"}\n')
    assert [[(m.role, m.content) for m in c.messages] for c in pc] == [
        [("user", "q"), ("assistant", "r")],
        [("assistant", "t")],
    ]
    txt = parse_document("t.txt", b"one\n\ntwo\r\n\r\nthree")
    assert [c.messages[0].content for c in txt] == ["one", "two", "three"]
    dialog = parse_document(
        "d.json",
        json.dumps(
            {
                "speaker": "Ann",
                "dialog": [
                    {"speaker": "Ann", "content": "a1"},
                    {"speaker": "Bob", "content": "b1"},
                    {"speaker": "Cy", "content": "c1"},
                    {"speaker": "Ann", "content": "a2"},
                    {"speaker": "Ann", "content": "a3"},
                ],
            }
        ).encode(),
    )
    assert [(m.role, m.content) for m in dialog[0].messages] == [
        ("assistant", "a1"),
        ("user", "b1\nc1"),
        ("assistant", "a2\na3"),
    ]


def test_malformed_line_is_reported_by_number() -> None:
    with pytest.raises(DocumentError) as err:
        parse_document("x.jsonl", b'{"text":"a"}\n{"text":"b"}\n{"text":\n')
    assert err.value.line == 3


def test_train_request_contract() -> None:
    req = TrainRequest.model_validate(
        {"schema": "avatune.train-request/v1", "job_id": "j-1", "user_id": "u", "avatar_id": "a", "config": {"r": 8}}
    )
    assert req.message_group_id() == "u/a" and req.config.r == 8
    for bad in ({"schema": "avatune.train-request/v2"}, {"user_id": "../x"}, {"config": {"r": 0}}, {"extra": 1}):
        with pytest.raises(ValidationError):
            TrainRequest.model_validate(
                {"schema": "avatune.train-request/v1", "job_id": "j", "user_id": "u", "avatar_id": "a", **bad}
            )


@pytest.mark.parametrize("filename", sorted(PUBLIC_MODELS))
def test_committed_json_schemas_are_current(filename: str) -> None:
    committed = (SCHEMAS_DIR / filename).read_text()
    assert committed == render(PUBLIC_MODELS[filename]), "run `make schemas` and commit schemas/"


def test_jsonl_lines_end_at_newline_only() -> None:
    """U+2028, U+0085 and form feeds may stand unescaped inside JSON strings (ensure_ascii=False
    writers emit them): they neither end a line nor break a record; CRLF files parse too."""
    from contracts.context_documents import parse_context_document

    text = '{"text": "one\u2028line"}\r\n\n{"text": "two\x85"}\x0c\n{"text": "three"}'
    conversations = parse_document("x.jsonl", text.encode())
    assert [c.messages[0].content for c in conversations] == ["one\u2028line", "two\x85", "three"]
    records = parse_context_document("x.jsonl", text.encode())
    assert [r.text for r in records] == ["one\u2028line", "two\x85", "three"]
    with pytest.raises(DocumentError) as err:
        parse_document("x.jsonl", b'{"text": "fine"}\n{"text": \n')
    assert err.value.line == 2
