"""Last in this package: every byte the malicious relay received or sent, to the client and to
the enclave, over all the cases above, holds no question and no answer in plaintext.
"""

from __future__ import annotations

import json

import pytest

from .conftest import Stack

pytestmark = pytest.mark.integration
MIN_CHARS = 12  # shorter text may occur in base64 or JSON by chance


def _forms(text: str) -> list[bytes]:
    return sorted({text.encode(), json.dumps(text)[1:-1].encode()})


def test_the_parent_saw_no_question_and_no_answer(adversary: Stack, still_serving, canary) -> None:
    # A question of this test's own, so that the check means something when run alone; its
    # canary is also looked for by the suite's sweep, in every log and capture of the run.
    question = f"What is the reference number {canary.new('adversarial')} for?"
    conversation = adversary.user().conversation()
    answer = conversation.ask(question, max_new_tokens=16)  # long enough to look for
    adversary.plaintexts += [question, answer.text.strip()]
    still_serving()

    seen = b"\n".join(adversary.relay.wire + adversary.enclave.wire)
    assert answer.request_id.encode() in seen  # the capture holds this exchange
    assert question.encode() not in seen
    secrets_ = [text for text in set(adversary.plaintexts) if len(text) >= MIN_CHARS]
    assert len(secrets_) >= 2
    leaked = [i for i, text in enumerate(secrets_) if any(f in seen for f in _forms(text))]
    # Only which (by index): a failure message must not print the plaintext itself.
    assert not leaked, f"{len(leaked)} of {len(secrets_)} plaintexts in the relayed bytes"
