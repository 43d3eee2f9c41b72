"""The parent role's credentials: the local file (re-read when it changes) and IMDSv2 through
botocore's fetcher against a stand-in metadata service that refuses IMDSv1."""

import datetime
import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from botocore.credentials import RefreshableCredentials

from parent_proxy.credentials import (
    CredentialsUnavailable,
    FileCredentials,
    ImdsCredentials,
    credential_source,
)
from protocol.messages import Credentials

ROLE = "nitro-llm-parent"
TOKEN_PATH = "/latest/api/token"
ROLE_PATH = "/latest/meta-data/iam/security-credentials/"


# ---- the local file ----------------------------------------------------------------------------


def write_credentials(path, akid, secret_key=None, token=None):
    path.write_text(
        json.dumps(
            {
                "credentials": {
                    "access_key_id": akid,
                    "secret_access_key": secret_key or "secret-1",
                    "session_token": token,
                }
            }
        )
    )


def test_file_credentials_are_read(tmp_path):
    path = tmp_path / "parent.json"
    write_credentials(path, "AKIAFILE1", "secret-1", "tok")
    assert FileCredentials(path).get() == Credentials("AKIAFILE1", "secret-1", "tok")


def test_file_credentials_are_reread_when_the_file_changes(tmp_path):
    path = tmp_path / "parent.json"
    write_credentials(path, "AKIAFILE1")
    source = FileCredentials(path)
    assert source.get().access_key_id == "AKIAFILE1"
    write_credentials(path, "AKIAFILE2")
    stamp = path.stat().st_mtime_ns + 1_000_000
    os.utime(path, ns=(stamp, stamp))  # a coarse clock must not hide the change
    assert source.get().access_key_id == "AKIAFILE2"


def test_file_credentials_are_cached_while_the_file_is_unchanged(tmp_path, monkeypatch):
    path = tmp_path / "parent.json"
    write_credentials(path, "AKIAFILE1")
    source = FileCredentials(path)
    source.get()
    reads = []
    monkeypatch.setattr(source, "_read", lambda: reads.append(1))
    assert source.get().access_key_id == "AKIAFILE1"
    assert reads == []


@pytest.mark.parametrize(
    "content",
    [
        b"not json",
        b"[]",
        b'{"creds": {}}',
        b'{"credentials": {"access_key_id": "AKIA", "secret_access_key": "super-secret-value"}}',
        b'{"credentials": {"access_key_id": 1, "secret_access_key": "super-secret-value",'
        b' "session_token": null}}',
        b"x" * 70_000,
    ],
)
def test_bad_credentials_file_is_a_clean_error_without_its_content(tmp_path, content):
    path = tmp_path / "parent.json"
    path.write_bytes(content)
    with pytest.raises(CredentialsUnavailable) as err:
        FileCredentials(path).get()
    assert "super-secret-value" not in str(err.value)
    assert err.value.http_status == 500


def test_missing_credentials_file_is_a_clean_error(tmp_path):
    with pytest.raises(CredentialsUnavailable):
        FileCredentials(tmp_path / "absent.json").get()


def test_source_is_the_file_in_local_mode_else_imds(tmp_path):
    assert isinstance(credential_source(tmp_path / "p.json", "http://127.0.0.1:1"), FileCredentials)
    assert isinstance(credential_source(None, "http://127.0.0.1:1"), ImdsCredentials)


# ---- IMDSv2 ------------------------------------------------------------------------------------


class StandInImds:
    """PUT /latest/api/token, then GETs that require its token (IMDSv2 only)."""

    def __init__(self, lifetime=datetime.timedelta(hours=6), issue_tokens=True):
        self.lifetime = lifetime
        self.issue_tokens = issue_tokens
        self.token = "imds-session-token-1"
        self.requests: list[tuple[str, str, bool]] = []  # method, path, carried the token
        self.refused: list[str] = []
        self.issued = 0
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass  # nothing of the metadata service goes to the test output

            def do_PUT(self):
                stand_in.requests.append(("PUT", self.path, False))
                ttl = self.headers.get("x-aws-ec2-metadata-token-ttl-seconds")
                if self.path != TOKEN_PATH or not stand_in.issue_tokens or not ttl:
                    return self.answer(403, b"")
                self.answer(200, stand_in.token.encode())

            def do_GET(self):
                has_token = self.headers.get("x-aws-ec2-metadata-token") == stand_in.token
                stand_in.requests.append(("GET", self.path, has_token))
                if not has_token:
                    stand_in.refused.append(self.path)
                    return self.answer(401, b"")
                if self.path == ROLE_PATH:
                    return self.answer(200, ROLE.encode())
                if self.path == ROLE_PATH + ROLE:
                    stand_in.issued += 1
                    return self.answer(200, json.dumps(stand_in.credentials()).encode())
                self.answer(404, b"")

            def answer(self, status, body):
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)

    def credentials(self):
        expires = datetime.datetime.now(datetime.UTC) + self.lifetime
        return {
            "Code": "Success",
            "LastUpdated": "2026-01-01T00:00:00Z",
            "Type": "AWS-HMAC",
            "AccessKeyId": f"ASIAROLE{self.issued:04d}",
            "SecretAccessKey": f"role-secret-{self.issued}",
            "Token": f"role-session-{self.issued}",
            "Expiration": expires.strftime("%Y-%m-%dT%H:%M:%SZ"),
        }

    def credential_fetches(self):
        return [r for r in self.requests if r[1] == ROLE_PATH + ROLE]


@pytest.fixture
def imds():
    stand_in = StandInImds()
    stand_in.thread.start()
    yield stand_in
    stand_in.server.shutdown()
    stand_in.server.server_close()


def test_imds_credentials_are_fetched_with_a_session_token(imds):
    credentials = ImdsCredentials(imds.endpoint).get()
    assert credentials == Credentials("ASIAROLE0001", "role-secret-1", "role-session-1")
    assert imds.requests[0][:2] == ("PUT", TOKEN_PATH)
    assert all(has_token for method, _path, has_token in imds.requests if method == "GET")
    assert imds.refused == []


def test_imds_credentials_are_cached(imds):
    source = ImdsCredentials(imds.endpoint)
    first = source.get()
    for _ in range(5):
        assert source.get() == first
    assert len(imds.credential_fetches()) == 1


def test_imds_credentials_are_refreshed_before_they_expire(imds, monkeypatch):
    source = ImdsCredentials(imds.endpoint)
    assert source.get().access_key_id == "ASIAROLE0001"
    # Pretend the 6-hour credentials are now inside botocore's refresh window.
    monkeypatch.setattr(RefreshableCredentials, "_advisory_refresh_timeout", 7 * 3600)
    assert source.get().access_key_id == "ASIAROLE0002"
    assert len(imds.credential_fetches()) == 2


def test_imdsv1_fallback_is_refused(imds):
    imds.issue_tokens = False  # a metadata service that would answer v1 requests
    with pytest.raises(CredentialsUnavailable):
        ImdsCredentials(imds.endpoint).get()
    assert not [r for r in imds.requests if r[0] == "GET"]  # never asked without a token


def test_the_stand_in_refuses_requests_without_the_token(imds):
    import urllib.error
    import urllib.request

    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(imds.endpoint + ROLE_PATH + ROLE, timeout=5)  # noqa: S310
    assert err.value.code == 401


def test_unreachable_imds_is_a_clean_error():
    source = ImdsCredentials("http://127.0.0.1:9", timeout=0.5, attempts=1)
    with pytest.raises(CredentialsUnavailable) as err:
        source.get()
    assert err.value.http_status == 500
