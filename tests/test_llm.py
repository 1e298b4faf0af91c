"""The retry loop shared by the LLM layout planner and the TIFA question generator."""

import pytest

from coherendream.llm import ask_until_valid


def _parse(answer: str) -> int:
    if not answer.isdigit():
        raise ValueError(f"{answer!r} is not a number")
    return int(answer)


def test_an_invalid_answer_is_shown_back_with_its_error_and_retried():
    seen = []
    replies = iter(["seven", "7"])

    def complete(messages):
        seen.append(messages)
        return next(replies)

    asked = ask_until_valid(complete, [{"role": "user", "content": "a number?"}], _parse, ValueError, max_attempts=3)
    assert (asked.value, asked.attempt, asked.answers) == (7, 2, ["seven", "7"])
    assert len(asked.errors) == 1 and "attempt 1" in asked.errors[0] and "not a number" in asked.errors[0]
    assert len(seen[0]) == 1 and len(seen[1]) == 3  # the retry carries the bad answer and the reason
    assert seen[1][1] == {"role": "assistant", "content": "seven"}
    assert seen[1][2]["role"] == "user" and "'seven' is not a number" in seen[1][2]["content"]


def test_failed_requests_and_invalid_answers_end_in_no_value():
    calls = []

    def complete(messages):
        calls.append(messages)
        if len(calls) == 1:
            raise ConnectionError("refused")
        return "x"

    asked = ask_until_valid(complete, [{"role": "user", "content": "?"}], _parse, ValueError, max_attempts=2)
    assert asked.value is None and asked.attempt == 2 and asked.answers == ["x"]
    assert "request failed: ConnectionError" in asked.errors[0] and "not a number" in asked.errors[1]
    assert len(calls[1]) == 1  # a failed request adds no feedback turns


def test_extract_json_is_shared_by_layouts_and_questions():
    from coherendream.llm import extract_json

    class Refused(ValueError):
        pass

    assert extract_json('Here:\n```json\n[{"question": "Is it red?"}]\n```', Refused, lists=True) == [{"question": "Is it red?"}]
    with pytest.raises(Refused, match="no JSON object"):
        extract_json("[1, 2]", Refused)  # a list only where the caller accepts one
    assert extract_json('I think {"a": 1} and then {"questions": []} fits', Refused, key="questions") == {"questions": []}
    for bad, why in (('{"x": NaN}', "NaN"), ('{"x": 1e999}', "not finite"), ("", "empty"), ("{" * 5, "not valid JSON"),
                     ("x" * 100_001, "characters long")):  # fmt: skip
        with pytest.raises(Refused, match=why):
            extract_json(bad, Refused)
