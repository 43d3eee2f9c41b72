"""The prompt format shared by the client, the enclave and the tiny model's training text.

A conversation is rendered as "Question: q1\nAnswer: a1\n\nQuestion: q2\nAnswer:"; the model
continues after the last "Answer:" and ends its answer with the end-of-sequence token.
"""

from __future__ import annotations

from collections.abc import Sequence

QUESTION_PREFIX = "Question: "
ANSWER_PREFIX = "Answer:"
TURN_SEPARATOR = "\n\n"


def format_turn(question: str, answer: str | None = None) -> str:
    """One turn; with no answer, the open turn the model is asked to complete."""
    turn = f"{QUESTION_PREFIX}{question.strip()}\n{ANSWER_PREFIX}"
    # The answer follows "Answer:" after one space, as in the training text.
    return turn if answer is None else f"{turn} {answer.strip()}"


def format_prompt(question: str, history: Sequence[tuple[str, str]] = ()) -> str:
    """The prompt for `question`, after the earlier (question, answer) turns in `history`."""
    turns = [format_turn(q, a) for q, a in history]
    turns.append(format_turn(question))
    return TURN_SEPARATOR.join(turns)
