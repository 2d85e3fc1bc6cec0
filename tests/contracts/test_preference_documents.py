"""Preference documents (contracts.preferences, contracts.training_documents): every accepted
shape becomes the same judgement, every malformed line is refused naming its line, and the two
kinds of training document never mix."""

from __future__ import annotations

import json

import pytest

from contracts.documents import DocumentError
from contracts.feedback import FeedbackBody, is_feedback_id, new_feedback_id
from contracts.preferences import Judgement, parse_preference_record
from contracts.training_documents import parse_training_document


def jsonl(*records: object) -> bytes:
    return ("\n".join(json.dumps(r) for r in records) + "\n").encode()


USER = [{"role": "user", "content": "How was the trip?"}]
CHOSEN = [{"role": "assistant", "content": "Lovely, thanks!"}]
REJECTED = [{"role": "assistant", "content": "It was a trip."}]

# Every shape of a pair (and of a rated reply) the issue names, each with the judgement it means.
PAIR_SHAPES = {
    "trl plain": {"prompt": "How was the trip?", "chosen": "Lovely, thanks!", "rejected": "It was a trip."},
    "trl conversational": {"prompt": USER, "chosen": CHOSEN, "rejected": REJECTED},
    "trl implicit prompt": {"chosen": USER + CHOSEN, "rejected": USER + REJECTED},
    "openai": {
        "input": {"messages": USER, "tools": [], "parallel_tool_calls": True},
        "preferred_output": CHOSEN,
        "non_preferred_output": REJECTED,
    },
    "avatune feedback (extra keys ignored)": {
        "prompt": USER,
        "chosen": CHOSEN,
        "rejected": REJECTED,
        "avatune_feedback": {"id": "feedback-0-0"},
    },
}


@pytest.mark.parametrize("shape", sorted(PAIR_SHAPES))
def test_every_pair_shape_is_the_same_judgement(shape: str) -> None:
    parsed = parse_training_document("pairs.jsonl", jsonl(PAIR_SHAPES[shape], PAIR_SHAPES[shape]))
    assert parsed.kind == "preferences" and parsed.conversations == []
    assert len(parsed.judgements) == 2
    judgement = parsed.judgements[0]
    assert judgement.kind == "pair"
    assert [(m.role, m.content) for m in judgement.prompt] == [("user", "How was the trip?")]
    assert (judgement.chosen, judgement.rejected) == ("Lovely, thanks!", "It was a trip.")


@pytest.mark.parametrize("label", [True, False])
@pytest.mark.parametrize("conversational", [True, False])
def test_kto_records_are_rated_replies(label: bool, conversational: bool) -> None:
    record = {
        "prompt": USER if conversational else "How was the trip?",
        "completion": CHOSEN if conversational else "Lovely, thanks!",
        "label": label,
    }
    judgement = parse_training_document("ratings.jsonl", jsonl(record)).judgements[0]
    assert judgement.kind == "rating"
    assert judgement.kto_items() == [("Lovely, thanks!", label)]
    assert (judgement.chosen is not None) == label and (judgement.rejected is not None) == (not label)


def test_system_messages_and_openai_developer_role_are_kept_as_system() -> None:
    record = {
        "input": {"messages": [{"role": "developer", "content": "Be brief."}, *USER]},
        "preferred_output": CHOSEN,
        "non_preferred_output": REJECTED,
    }
    judgement = parse_preference_record(record)
    assert [m.role for m in judgement.prompt] == ["system", "user"]


def test_a_judgement_round_trips_through_its_stored_record() -> None:
    for judgement in (
        Judgement(prompt=parse_preference_record(PAIR_SHAPES["trl plain"]).prompt, chosen="yes", rejected="no"),
        Judgement(prompt=parse_preference_record(PAIR_SHAPES["trl plain"]).prompt, rejected="no"),
    ):
        again = parse_training_document("f.jsonl", jsonl(judgement.to_record({"id": "x"}))).judgements[0]
        assert again == judgement


def test_demonstrations_are_still_demonstrations() -> None:
    parsed = parse_training_document(
        "chat.jsonl", jsonl({"messages": USER + CHOSEN}, {"prompt": "q", "completion": "a"})
    )
    assert parsed.kind == "demonstrations" and len(parsed.conversations) == 2 and parsed.judgements == []
    assert parse_training_document("notes.txt", b"one\n\ntwo").kind == "demonstrations"


GOOD = PAIR_SHAPES["trl conversational"]
# (the bad line, what the 422 must say): each preceded by one good line, so the error names line 2.
BAD_LINES = [
    ({"prompt": USER, "chosen": CHOSEN, "rejected": CHOSEN}, "chosen and rejected are the same reply"),
    ({"prompt": "q", "chosen": "same", "rejected": "  same "}, "chosen and rejected are the same reply"),
    ({"prompt": USER, "chosen": "", "rejected": "no"}, "chosen is an empty reply"),
    ({"prompt": USER, "chosen": "yes", "rejected": "   "}, "rejected is an empty reply"),
    ({"prompt": USER, "completion": "", "label": True}, "chosen is an empty reply"),
    ({"prompt": [{"role": "bot", "content": "hi"}], "chosen": "a", "rejected": "b"}, "unknown role 'bot'"),
    (
        {
            "input": {"messages": [{"role": "tool", "content": "x"}]},
            "preferred_output": CHOSEN,
            "non_preferred_output": REJECTED,
        },
        "unknown role 'tool'",
    ),
    ({"prompt": USER, "chosen": [{"role": "user", "content": "a"}], "rejected": "b"}, "exactly one assistant message"),
    ({"prompt": USER, "chosen": "a"}, 'needs "chosen" and "rejected"'),
    ({"prompt": USER, "completion": "a", "label": "yes"}, "label must be true"),
    ({"prompt": "", "chosen": "a", "rejected": "b"}, "prompt is empty"),
    ({"prompt": USER + CHOSEN, "chosen": "a", "rejected": "b"}, "prompt ends with an assistant message"),
    ({"prompt": USER, "chosen": 3, "rejected": "b"}, "chosen must be a string"),
    ({"preferred_output": CHOSEN, "non_preferred_output": REJECTED}, 'missing "input"'),
    ({"messages": USER + CHOSEN}, "a demonstration record in a document of preferences"),
    (["not", "an", "object"], "JSON object"),
    ({"answer": "x"}, "not a preference record"),
]


@pytest.mark.parametrize(("line", "message"), BAD_LINES, ids=[m for _, m in BAD_LINES])
def test_a_malformed_preference_line_is_refused_naming_its_line(line: object, message: str) -> None:
    with pytest.raises(DocumentError) as caught:
        parse_training_document("pairs.jsonl", jsonl(GOOD, line))
    assert caught.value.line == 2
    assert message in caught.value.message


def test_a_preference_line_in_a_demonstration_document_is_refused_naming_its_line() -> None:
    with pytest.raises(DocumentError) as caught:
        parse_training_document("mixed.jsonl", jsonl({"messages": USER + CHOSEN}, {}, GOOD))
    assert caught.value.line == 2  # {} is neither: a demonstration document's line that is no record
    with pytest.raises(DocumentError) as caught:
        parse_training_document("mixed.jsonl", jsonl({"messages": USER + CHOSEN}, GOOD))
    assert caught.value.line == 2 and "a preference record in a document of demonstrations" in caught.value.message


def test_feedback_ids_sort_newest_first_and_never_collide() -> None:
    older, newer = new_feedback_id(now_ms=1_700_000_000_000), new_feedback_id(now_ms=1_700_000_000_001)
    assert newer < older and is_feedback_id(newer) and is_feedback_id(older)
    assert len({new_feedback_id(now_ms=5) for _ in range(200)}) == 200
    assert not is_feedback_id("feedback-../../x") and not is_feedback_id("job-1")


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "body"),
        ({"messages": USER, "reply": "hi"}, "rating"),
        ({"reply": "hi", "rating": "up"}, "messages"),
        ({"messages": USER, "chosen": "a"}, "rejected"),
        ({"messages": USER, "chosen": "a", "rejected": "b", "rating": "up"}, "rating"),
        ({"generation_id": "job-1"}, "rating"),
        ({"generation_id": "job-1", "rating": "up", "correction": "better"}, "rating"),
        ({"generation_id": "job-1", "rating": "down", "messages": USER}, "messages"),
        ({"messages": USER, "reply": "x", "rating": "down", "correction": "y"}, "correction"),
    ],
)
def test_feedback_bodies_that_are_no_shape_name_the_field(body: dict, field: str) -> None:
    problem = FeedbackBody.model_validate(body).shape_problem()
    assert problem is not None and problem[0] == field


def test_the_three_feedback_shapes_are_accepted() -> None:
    for body in (
        {"messages": USER, "reply": "hi", "rating": "down"},
        {"messages": USER, "chosen": "a", "rejected": "b"},
        {"generation_id": "job-1", "rating": "down"},
        {"generation_id": "job-1", "correction": "better"},
        {"generation_id": "job-1", "rating": "down", "correction": "better"},
    ):
        assert FeedbackBody.model_validate(body).shape_problem() is None
