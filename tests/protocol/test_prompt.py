"""Tests for protocol/prompt.py: the conversation format the model was trained on."""

from __future__ import annotations

from protocol.prompt import format_prompt


def test_single_question_ends_where_the_answer_starts() -> None:
    assert format_prompt("What is vesting?") == "Question: What is vesting?\nAnswer:"


def test_history_turns_come_first_separated_by_blank_lines() -> None:
    prompt = format_prompt("And a Roth?", [("What is a 401(k)?", "A plan."), ("Match?", "Yes.")])
    assert prompt == (
        "Question: What is a 401(k)?\nAnswer: A plan.\n\n"
        "Question: Match?\nAnswer: Yes.\n\n"
        "Question: And a Roth?\nAnswer:"
    )


def test_surrounding_whitespace_is_dropped() -> None:
    assert (
        format_prompt("  q?\n", [(" q0 ", "\na0\n")])
        == "Question: q0\nAnswer: a0\n\nQuestion: q?\nAnswer:"
    )
