"""No secret leaves through validation messages (issue 11).

A tenant who may create Datasets but not read Secrets can point ``source.uri`` at the file where
the validation pod mounts the Dataset's ``secretRef`` (``format: csv``: the secret becomes the
"header"). Whatever the pod writes back — the Dataset status JSON (Ready condition, firstErrors),
the text report, the prep stage's status.json, the progress document's error, log lines — must
not carry file content. Each case writes a file whose content is a fresh random token, drives a
failure through the code the validation pod and the prep stage run, checks the failure is the
expected one (so a case cannot pass by producing nothing) and that the token appears nowhere.

Also unit tests of :func:`tailor_trainer.redact.redact`, the mask applied to those messages.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import secrets
import string
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tailor_trainer.data import DataError
from tailor_trainer.redact import redact
from tailor_trainer.report import FileSink, Reporter
from tailor_trainer.stages import DataInvalid
from tailor_trainer.stages import prep

REPO = Path(__file__).resolve().parents[2]


def hex_token() -> str:
    return secrets.token_hex(16)


def hf_token() -> str:
    # hf_ + 34 alphanumerics: the shape of a Hugging Face token (redact masks it as well; the
    # hex one is not credential-shaped, so only "never echo content" keeps it out).
    alnum = string.ascii_letters + string.digits
    return "hf_" + "".join(secrets.choice(alnum) for _ in range(34))


TOKENS = {"hex": hex_token, "hf": hf_token}


# ---------------------------------------------------------------------------------------------
# Cases: (write the files under a directory, return the Dataset spec) and the expected reason.
# Every case's spec is plain text that names no token; only the file content holds it.


def secret_mount_csv(d: Path, token: str) -> dict:
    # A projected Secret volume: a file named by the key, holding the value (no newline).
    mount = d / "secret-mount"
    mount.mkdir()
    (mount / "token").write_text(token)
    return {"source": {"uri": str(mount / "token")}, "format": "csv"}


def secret_mount_csv_newline(d: Path, token: str) -> dict:
    (d / "api-key").write_text(token + "\n")
    return {"source": {"uri": str(d / "api-key")}, "format": "csv", "schema": "completion"}


def csv_value_missing_column(d: Path, token: str) -> dict:
    (d / "d.csv").write_text(f"prompt,other\n{token},x\n")
    return {"source": {"uri": str(d / "d.csv")}, "schema": "completion"}


def csv_bad_rows(d: Path, token: str) -> dict:
    # Rows that are malformed around the token: wrong field count, a broken quote, invalid UTF-8.
    (d / "d.csv").write_bytes(
        b"prompt,completion\n"
        + f"{token},{token},{token}\n".encode()
        + f'"{token}"{token},x\n'.encode()
        + token.encode() + b"\xe9,x\n"
        + f"ok,{token}\n".encode())
    return {"source": {"uri": str(d / "d.csv")}, "schema": "completion",
            "preprocessing": {"maxBadFraction": 0.1}}


def csv_token_header_bad_field(d: Path, token: str) -> dict:
    # The required columns are there; an extra header cell is the token and a row's field under
    # it is not UTF-8: the row's issue must name the field by number, not by that cell.
    (d / "d.csv").write_bytes(f"prompt,completion,{token}\nq,a,x\n".encode() + b"q,a,\xe9\n")
    return {"source": {"uri": str(d / "d.csv")}, "schema": "completion",
            "preprocessing": {"maxBadFraction": 0.1}}


def jsonl_broken(d: Path, token: str) -> dict:
    (d / "d.jsonl").write_text("\n".join([
        f'{{"text": "{token}',                    # unterminated string
        f'{{{token}: 1}}',                         # unquoted key
        f'{{"text": "{token}"}} {token}',          # extra data
        f'{{"text": "\\{token[0]}{token}"}}',      # invalid escape (may quote the character)
        f'{{"text": "{token}\x01"}}',               # control character
        f'"{token}"',                               # not an object
        f'{{"text": {token}}}',                    # bare word
        '{"text": "fine"}',
    ]) + "\n")
    return {"source": {"uri": str(d / "d.jsonl")}, "preprocessing": {"maxBadFraction": 0.5}}


def jsonl_token_keys(d: Path, token: str) -> dict:
    (d / "d.jsonl").write_text("".join(json.dumps({token: "x", f"{token}-2": "y"}) + "\n" for _ in range(3)))
    return {"source": {"uri": str(d / "d.jsonl")}}


def jsonl_token_key_mapped(d: Path, token: str) -> dict:
    # columnMap names a column the rows lack; the rows' own keys (the token) stay unnamed.
    (d / "d.jsonl").write_text(json.dumps({token: "q", "completion": "a"}) + "\n")
    return {"source": {"uri": str(d / "d.jsonl")}, "schema": "completion",
            "columnMap": {"prompt": "question"}}


def chat_message_string(d: Path, token: str) -> dict:
    (d / "c.jsonl").write_text(json.dumps({"messages": f"[{{{token}"}) + "\n")
    return {"source": {"uri": str(d / "c.jsonl")}, "schema": "chat"}


def text_file(d: Path, token: str) -> dict:
    (d / "secret.txt").write_text(f"{token}\n{token}\n")
    return {"source": {"uri": str(d / "secret.txt")}, "schema": "completion"}


def parquet_token_column(d: Path, token: str) -> dict:
    pq.write_table(pa.table({token: [token, token], "completion": ["a", "b"]}), d / "d.parquet")
    return {"source": {"uri": str(d / "d.parquet")}, "schema": "completion"}


def parquet_not_parquet(d: Path, token: str) -> dict:
    (d / "token").write_text(token)
    return {"source": {"uri": str(d / "token")}, "format": "parquet"}


def gzip_not_gzip(d: Path, token: str) -> dict:
    (d / "d.jsonl.gz").write_text(token)
    return {"source": {"uri": str(d / "d.jsonl.gz")}}


def gzip_token_keys(d: Path, token: str) -> dict:
    with gzip.open(d / "d.jsonl.gz", "wt") as f:
        f.write(json.dumps({token: 1}) + "\n")
    return {"source": {"uri": str(d / "d.jsonl.gz")}}


def missing_file(d: Path, token: str) -> dict:
    return {"source": {"uri": str(d / "nowhere" / "data.jsonl")}}


def hf_local_cast_error(d: Path, token: str) -> dict:
    # The datasets library's own errors quote column names (a CastError lists the schema).
    pytest.importorskip("datasets")
    (d / "hf").mkdir()
    (d / "hf" / "a.jsonl").write_text(json.dumps({"text": "x"}) + "\n")
    (d / "hf" / "b.jsonl").write_text(json.dumps({token: token}) + "\n")
    return {"source": {"uri": f"hf://{d / 'hf'}"}}


CASES: dict[str, tuple[Callable[[Path, str], dict], str]] = {
    "secret-mount-csv": (secret_mount_csv, "MissingColumn"),
    "secret-mount-csv-newline": (secret_mount_csv_newline, "MissingColumn"),
    "csv-value-missing-column": (csv_value_missing_column, "MissingColumn"),
    "csv-bad-rows": (csv_bad_rows, "TooManyBadRows"),
    "csv-token-header-bad-field": (csv_token_header_bad_field, "TooManyBadRows"),
    "jsonl-broken": (jsonl_broken, "TooManyBadRows"),
    "jsonl-token-keys": (jsonl_token_keys, "MissingColumn"),
    "jsonl-token-key-mapped": (jsonl_token_key_mapped, "MissingColumn"),
    "chat-message-string": (chat_message_string, "TooManyBadRows"),
    "text-file": (text_file, "MissingColumn"),
    "parquet-token-column": (parquet_token_column, "MissingColumn"),
    "parquet-not-parquet": (parquet_not_parquet, "BadParquet"),
    "gzip-not-gzip": (gzip_not_gzip, "SourceUnreachable"),
    "gzip-token-keys": (gzip_token_keys, "MissingColumn"),
    "missing-file": (missing_file, "EmptySource"),
    "hf-local-cast-error": (hf_local_cast_error, "SourceUnreachable"),
}


def assert_absent(token: str, where: str, text: str) -> None:
    assert token not in text, f"the secret leaked into {where}:\n{text}"
    # gzip's "Not a gzipped file (b'..')" style: no bytes of the file quoted at all.
    assert f"b'{token[:2]}" not in text and f'b"{token[:2]}' not in text, where


def all_files(root: Path) -> dict[str, str]:
    return {str(p): p.read_bytes().decode("utf-8", "replace") for p in root.rglob("*") if p.is_file()}


# ---------------------------------------------------------------------------------------------
# The validation pod's path: python -m tailor_trainer inspect (main_inspect), JSON and text


@pytest.mark.parametrize("kind", sorted(TOKENS))
@pytest.mark.parametrize("case", sorted(CASES))
def test_inspect_never_echoes_the_source(tmp_path, capsys, caplog, case, kind):
    caplog.set_level(logging.DEBUG)
    token = TOKENS[kind]()
    write, reason = CASES[case]
    data = tmp_path / "data"
    data.mkdir()
    spec = {"name": "d", **write(data, token)}
    assert token not in json.dumps(spec)  # the spec itself is not secret
    (tmp_path / "ds.json").write_text(json.dumps(spec))
    result_file = tmp_path / "out" / "status.json"

    code = prep.main_inspect(str(tmp_path / "ds.json"), output="json", result_file=str(result_file))
    out = capsys.readouterr()
    status = json.loads(out.out)
    cond = status["conditions"][0]
    assert code == 1 and cond["status"] == "False"
    assert cond["reason"] == reason, cond["message"]
    assert cond["message"]  # says something (file, line, count), just not the content
    assert json.loads(result_file.read_text()) == status

    code = prep.main_inspect(str(tmp_path / "ds.json"), output="text")
    text = capsys.readouterr()
    assert code == 1 and reason in text.out

    for where, body in {"inspect json": out.out + out.err, "inspect text": text.out + text.err,
                        "result file": result_file.read_text(), "log": caplog.text}.items():
        assert_absent(token, where, body)


def test_inspect_subprocess_secret_mount(tmp_path):
    """The exact command the validation pod runs, on a Secret-mount-shaped file."""
    token = hex_token()
    spec = {"name": "d", **secret_mount_csv(tmp_path, token)}
    (tmp_path / "ds.json").write_text(json.dumps(spec))
    result = tmp_path / "result.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "operator"), str(REPO / "trainer")])}
    proc = subprocess.run([sys.executable, "-m", "tailor_trainer", "inspect", "--dataset",
                           str(tmp_path / "ds.json"), "--output", "json", "--result-file", str(result)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 1, proc.stderr
    status = json.loads(result.read_text())
    assert status["conditions"][0]["reason"] == "MissingColumn"
    assert "the header has 1 column" in status["conditions"][0]["message"]
    assert_absent(token, "subprocess output", proc.stdout + proc.stderr + result.read_text())


# ---------------------------------------------------------------------------------------------
# The prep stage's path: python -m tailor_trainer run --stages prep (progress document, logs,
# prep/status.json, everything under the run directory)


PREP_CASES = ["secret-mount-csv", "csv-bad-rows", "csv-token-header-bad-field", "jsonl-broken",
              "jsonl-token-keys", "text-file",
              "parquet-token-column", "parquet-not-parquet", "missing-file"]


@pytest.mark.parametrize("case", PREP_CASES)
def test_prep_stage_never_echoes_the_source(tmp_path, capfd, caplog, tiny_tokenizer_dir, case):
    from tailor_trainer.pipeline import main_run

    caplog.set_level(logging.DEBUG)
    token = hex_token()
    write, reason = CASES[case]
    data = tmp_path / "data"
    data.mkdir()
    spec = write(data, token)
    run_dir, progress = tmp_path / "run", tmp_path / "progress.json"
    config = {
        "run": {"job": "j", "name": "j-r1"},
        "model": {"uri": str(tiny_tokenizer_dir)},
        "dataset": {"name": "d", "schema": "text", **spec},
        "hyperparameters": {"maxSeqLength": 64},
        "outputUri": str(run_dir),
        "progress": {"file": str(progress)},
    }
    (tmp_path / "config.json").write_text(json.dumps(config))

    assert main_run(str(tmp_path / "config.json"), stages="prep") == 1
    doc = json.loads(progress.read_text())
    assert doc["state"] == "Failed" and doc["error"]["reason"] == "DataInvalid"
    assert doc["error"]["message"].startswith(f"{reason}: "), doc["error"]["message"]
    status = json.loads((run_dir / "prep" / "status.json").read_text())
    assert status["conditions"][0]["reason"] == reason

    std = capfd.readouterr()
    texts = {"stdout": std.out, "stderr": std.err, "log": caplog.text, **all_files(run_dir),
             "progress": progress.read_text()}
    for where, body in texts.items():
        assert_absent(token, where, body)


def test_parser_messages_are_reported_by_kind_only():
    import csv

    from tailor_trainer.data.formats import csv_problem, json_problem

    token = hex_token()
    assert csv_problem(csv.Error("field larger than field limit (131072)")) == \
        "field larger than field limit (131072)"
    assert csv_problem(csv.Error(f"unknown trouble near {token!r}")) == "malformed CSV record"
    for text in (f'{{"a": "\\{token}"}}', f'{{"a": "{token}\x01"}}', f"{{{token}}}", f"[{token}"):
        try:
            json.loads(text)
        except json.JSONDecodeError as e:
            assert token not in json_problem(e) and json_problem(e) != "invalid JSON", e.msg
    fake = json.JSONDecodeError(f"Invalid \\escape: {token!r}", "x", 0)
    assert json_problem(fake) == "Invalid \\escape"
    fake = json.JSONDecodeError(f"Something new: {token}", "x", 0)
    assert json_problem(fake) == "invalid JSON"


# ---------------------------------------------------------------------------------------------
# The masks on messages that leave the pod


def test_messages_that_leave_the_pod_are_redacted(tmp_path):
    key, hf = "AKIA" + "ABCDEFGHIJKLMNOP", hf_token()
    err = DataError("SourceUnreachable", f"cannot read https://u:pw@h/x?X-Amz-Signature=s3cr3t: {hf}")
    assert "pw" not in err.message and "s3cr3t" not in err.message and hf not in err.message
    assert str(err) == err.message and err.message.startswith("cannot read https://REDACTED@h/x?")

    assert DataInvalid(f"bad key {key}").message == "bad key REDACTED"

    path = tmp_path / "progress.json"
    from tailor_trainer.config import RunInfo

    reporter = Reporter(RunInfo(job="j", name="j-r1"), [FileSink(str(path))])
    reporter.fail("InternalError", f"ClientError: Authorization: Bearer {hf}x.y")
    doc = json.loads(path.read_text())
    assert doc["error"]["message"] == "ClientError: Authorization: Bearer REDACTED"


@pytest.mark.parametrize("text, expected", [
    ("https://user:pass@example.com/d.jsonl", "https://REDACTED@example.com/d.jsonl"),
    ("s3://AKIAIOSFODNN7EXAMPLE:wJalr@minio:9000/b", "s3://REDACTED@minio:9000/b"),
    ("https://b.s3.amazonaws.com/d.csv?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIA%2F2024"
     "&X-Amz-Security-Token=IQoJ&X-Amz-Signature=abc123 (403)",
     "https://b.s3.amazonaws.com/d.csv?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=REDACTED"
     "&X-Amz-Security-Token=REDACTED&X-Amz-Signature=REDACTED (403)"),
    ("https://storage.googleapis.com/b/o?x-goog-signature=ff00&X-Goog-Credential=sa%40p",
     "https://storage.googleapis.com/b/o?x-goog-signature=REDACTED&X-Goog-Credential=REDACTED"),
    ("https://acct.blob.core.windows.net/c/d.parquet?sv=2022&sig=abc%2Bdef%3D",
     "https://acct.blob.core.windows.net/c/d.parquet?sv=2022&sig=REDACTED"),
    ("GET /d?Signature=x1&AWSAccessKeyId=AKIAIOSFODNN7EXAMPLE&Expires=1",
     "GET /d?Signature=REDACTED&AWSAccessKeyId=REDACTED&Expires=1"),
    ("http://h/x?token=t&access_token=a&api_key=k&apikey=k2&key=k3&password=p&secret=s&page=2",
     "http://h/x?token=REDACTED&access_token=REDACTED&api_key=REDACTED&apikey=REDACTED&key=REDACTED"
     "&password=REDACTED&secret=REDACTED&page=2"),
    ("http://h/x?TOKEN=abc#frag", "http://h/x?TOKEN=REDACTED#frag"),
    ("key id AKIAIOSFODNN7EXAMPLE and ASIAABCDEFGHIJKLMNOP", "key id REDACTED and REDACTED"),
    ("login with hf_abcdefghijklmnopqrstuvwxyzABCDEF012 failed", "login with REDACTED failed"),
    ("Authorization: Bearer eyJhbGciOi.eyJzdWIi.sig-_", "Authorization: Bearer REDACTED"),
    ("authorization: bearer abcdefghijklmnopqrstu", "authorization: bearer REDACTED"),
    ("x\n-----BEGIN RSA PRIVATE KEY-----\nMIIEow\nIBAAK\n-----END RSA PRIVATE KEY-----\ny",
     "x\n-----BEGIN RSA PRIVATE KEY----- REDACTED -----END RSA PRIVATE KEY-----\ny"),
    ("cut short: -----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNz",
     "cut short: -----BEGIN OPENSSH PRIVATE KEY----- REDACTED -----END OPENSSH PRIVATE KEY-----"),
])
def test_redact_masks_credentials(text, expected):
    assert redact(text) == expected
    assert redact(expected) == expected  # idempotent


@pytest.mark.parametrize("text", [
    "",
    "all 4 rows were dropped (empty 2, tooShort 2)",
    "/data/train.csv: column 'prompt' not found; the header has 3 columns",
    "line 12: Expecting ',' delimiter (column 7)",
    "https://example.com/data/train.jsonl?page=2&format=csv",
    "s3://bucket/prefix/key=2024/part-0.parquet",
    "pvc://claim/datasets/support.jsonl",
    "hf://org/dataset-name",
    "cannot read s3://b/k: ClientError: An error occurred (403) when calling the HeadObject operation",
    "the bearer of this message; keyword=value; monkey=1; ?sort=asc",
    "support@example.com and git@github.com:org/repo.git",
    "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----",
    "hf_short and AKIA123 are not credentials; sha 0123456789abcdef0123456789abcdef",
])
def test_redact_leaves_ordinary_text_alone(text):
    assert redact(text) == text
