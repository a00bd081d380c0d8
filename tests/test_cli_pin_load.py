"""`slmfleet pin` and `slmfleet load` as a user (or an init container) runs them."""

import hashlib
import os
import socket
import subprocess
import sys
import time

import boto3
import pytest
from moto import mock_aws

from slmfleet.cli.main import main
from slmfleet.weights import loader
from slmfleet.weights.errors import (
    EXIT_DIGEST_MISMATCH,
    EXIT_FILE_MISMATCH,
    EXIT_OK,
    EXIT_REFUSED_FORMAT,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
)
from slmfleet.weights.loader import write_termination_message
from slmfleet.weights.manifest import MANIFEST_NAME, VERIFIED_MARKER, Manifest

FAST = ["--retries", "2", "--retry-wait", "0.01", "--retry-max-wait", "0.02", "--part-size", "64KiB",
        "--no-progress"]


@pytest.fixture
def model(tmp_path):
    root = tmp_path / "model"
    (root / "sub").mkdir(parents=True)
    files = {"config.json": b'{"model_type": "llama"}', "model.safetensors": os.urandom(200_000),
             "sub/tokenizer.json": b"{}"}
    for rel, data in files.items():
        (root / rel).write_bytes(data)
    return root, files


def run(capsys, *args):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def pin_digest(capsys, *args):
    code, out, err = run(capsys, "pin", *args)
    assert code == EXIT_OK, err
    return out.splitlines()[-1]


def test_pin_prints_the_digest_last(capsys, model):
    root, files = model
    code, out, err = run(capsys, "pin", str(root), "--no-progress")
    assert code == 0 and out.splitlines() == [out.strip()]
    digest = out.strip()
    assert digest.startswith("sha256:") and len(digest) == 71 and "3 files" in err
    assert not (root / MANIFEST_NAME).exists()
    code, out, err = run(capsys, "pin", str(root), "--list", "--write", "--workers", "2")
    lines = out.splitlines()
    assert code == 0 and lines[-1] == digest and len(lines) == 4
    assert lines[0].split() == [hashlib.sha256(files["config.json"]).hexdigest(), str(len(files["config.json"])),
                                "config.json"]
    assert Manifest.parse((root / MANIFEST_NAME).read_bytes()).digest == digest
    assert "wrote" in err
    (root / "config.json").write_text("{}")
    code, out, err = run(capsys, "pin", str(root))
    assert out.splitlines()[-1] != digest and "stale" in err


def test_pin_errors(capsys, tmp_path):
    code, out, err = run(capsys, "pin", str(tmp_path / "nope"))
    assert code != 0 and out == "" and "nope" in err
    code, out, err = run(capsys, "pin", "s3://Not_A_Bucket/x")
    assert code == EXIT_USAGE and out == ""


def test_load_from_a_directory_then_cache(capsys, model, tmp_path):
    root, files = model
    digest = pin_digest(capsys, str(root), "--write")
    dest = tmp_path / "dest"
    term = tmp_path / "termination-log"
    code, out, err = run(capsys, "load", "--source", str(root), "--digest", digest, "--dest", str(dest),
                         "--termination-message-path", str(term), *FAST)
    assert code == EXIT_OK, err
    assert out.splitlines()[-1] == digest
    assert all((dest / rel).read_bytes() == data for rel, data in files.items())
    assert "verified" in term.read_text() and digest in term.read_text()
    for rel in files:  # one line per file, with its size and rate
        assert any(rel in line and "/s" in line for line in err.splitlines()), rel
    t0 = time.monotonic()
    code, out, err = run(capsys, "load", "--source", str(root), "--digest", digest, "--dest", str(dest), *FAST)
    assert code == EXIT_OK and "cache hit" in err and time.monotonic() - t0 < 1
    code, out, err = run(capsys, "load", "--source", str(root), "--digest", digest, "--dest", str(dest),
                         "--reverify", *FAST)
    assert code == EXIT_OK and "re-hashed" in err


def test_load_wrong_pin(capsys, model, tmp_path):
    root, _files = model
    digest = pin_digest(capsys, str(root), "--write")
    wrong = "sha256:" + "e" * 64
    term = tmp_path / "term"
    code, out, err = run(capsys, "load", "--source", f"file://{root}", "--digest", wrong, "--dest",
                         str(tmp_path / "dest"), "--termination-message-path", str(term), *FAST)
    assert code == EXIT_DIGEST_MISMATCH and out == ""
    for text in (err, term.read_text()):
        assert "manifest digest mismatch" in text and digest in text and wrong in text


def test_load_file_mismatch_reports_file_and_hashes_everywhere(capsys, model, tmp_path):
    root, files = model
    digest = pin_digest(capsys, str(root), "--write")
    data = bytearray(files["model.safetensors"])
    data[-1] ^= 0x80
    (root / "model.safetensors").write_bytes(bytes(data))
    term = tmp_path / "term"
    code, out, err = run(capsys, "load", "--source", str(root), "--digest", digest, "--dest",
                         str(tmp_path / "dest"), "--termination-message-path", str(term), *FAST)
    assert code == EXIT_FILE_MISMATCH
    expected = hashlib.sha256(files["model.safetensors"]).hexdigest()
    actual = hashlib.sha256(bytes(data)).hexdigest()
    for text in (err, term.read_text()):
        assert "model.safetensors" in text and f"expected sha256:{expected}" in text and f"got sha256:{actual}" in text
    assert not (tmp_path / "dest" / VERIFIED_MARKER).exists()


def test_load_pickle_refused_and_allowed(capsys, model, tmp_path):
    root, _files = model
    (root / "training_args.bin").write_bytes(b"\x80\x04")
    digest = pin_digest(capsys, str(root), "--write")
    code, _, err = run(capsys, "load", "--source", str(root), "--digest", digest, "--dest",
                       str(tmp_path / "d1"), "--termination-message-path", str(tmp_path / "t"), *FAST)
    assert code == EXIT_REFUSED_FORMAT and "training_args.bin" in err and "--allow-pickle" in err
    code, _, err = run(capsys, "load", "--source", str(root), "--digest", digest, "--dest",
                       str(tmp_path / "d2"), "--allow-pickle", *FAST)
    assert code == EXIT_OK, err


def test_load_usage_errors(capsys, model, tmp_path):
    root, _files = model
    code, _, err = run(capsys, "load", "--source", str(root), "--digest", "sha256:nothex", "--dest",
                       str(tmp_path / "d"), "--termination-message-path", str(tmp_path / "t"))
    assert code == EXIT_USAGE and "sha256:nothex" in err and "sha256:nothex" in (tmp_path / "t").read_text()
    with pytest.raises(SystemExit) as exc:
        main(["load", "--source", str(root)])
    assert exc.value.code == EXIT_USAGE


def test_termination_message_is_best_effort(capsys, model, tmp_path, monkeypatch):
    assert not write_termination_message("x", str(tmp_path / "no" / "such" / "dir" / "file"))
    monkeypatch.setattr(loader, "TERMINATION_LOG", str(tmp_path / "absent"))
    assert not write_termination_message("x") and not (tmp_path / "absent").exists()
    (tmp_path / "present").write_text("")
    monkeypatch.setattr(loader, "TERMINATION_LOG", str(tmp_path / "present"))
    assert write_termination_message("é" * 5000)
    written = (tmp_path / "present").read_bytes()
    assert len(written) <= 4096 and written.decode() == "é" * 2048
    root, _files = model
    code, _, err = run(capsys, "load", "--source", str(root), "--digest", "sha256:" + "0" * 64, "--dest",
                       str(tmp_path / "d"), "--termination-message-path", str(tmp_path / "no" / "dir" / "t"), *FAST)
    assert code == EXIT_DIGEST_MISMATCH and "could not write the termination message" in err


def test_help_documents_the_exit_codes():
    out = subprocess.run([sys.executable, "-m", "slmfleet.cli.main", "load", "--help"], capture_output=True,
                         text=True, check=True).stdout
    for code in (EXIT_OK, EXIT_DIGEST_MISMATCH, EXIT_FILE_MISMATCH, EXIT_REFUSED_FORMAT, EXIT_UNREACHABLE):
        assert f"\n  {code:>2}  " in out
    assert "--reverify" in out and "cache" in out


# --- S3 -----------------------------------------------------------------------------------------------


@pytest.fixture
def aws_env(monkeypatch):
    for key in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI-secret")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")


def test_pin_and_load_on_s3(capsys, aws_env, model, tmp_path):
    root, files = model
    local = pin_digest(capsys, str(root))
    with mock_aws():
        s3 = boto3.client("s3", region_name="us-east-1")
        s3.create_bucket(Bucket="weights")
        for rel, data in files.items():
            s3.put_object(Bucket="weights", Key=f"llama/{rel}", Body=data)
        code, out, err = run(capsys, "pin", "s3://weights/llama/", "--write", *FAST)
        assert code == EXIT_OK and out.splitlines()[-1] == local
        stored = s3.get_object(Bucket="weights", Key=f"llama/{MANIFEST_NAME}")["Body"].read()
        assert "sha256:" + hashlib.sha256(stored).hexdigest() == local
        code, out, err = run(capsys, "load", "--source", "s3://weights/llama", "--digest", local, "--dest",
                             str(tmp_path / "dest"), "--concurrency", "3", *FAST)
        assert code == EXIT_OK, err
        assert out.splitlines()[-1] == local
        assert all((tmp_path / "dest" / rel).read_bytes() == data for rel, data in files.items())
        assert "downloaded model.safetensors" in err
        assert "wJalrXUtnFEMI-secret" not in err + out and "AKIDEXAMPLE" not in err + out


def test_load_unreachable_endpoint(capsys, aws_env, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    term = tmp_path / "term"
    t0 = time.monotonic()
    code, out, err = run(capsys, "load", "--source", "s3://weights/llama/", "--digest", "sha256:" + "0" * 64,
                         "--dest", str(tmp_path / "dest"), "--endpoint-url", f"http://127.0.0.1:{port}",
                         "--connect-timeout", "1", "--termination-message-path", str(term), *FAST)
    assert code == EXIT_UNREACHABLE and time.monotonic() - t0 < 10
    assert err.count("retrying") == 1 and "2 attempts" in term.read_text()
    assert "wJalrXUtnFEMI-secret" not in err + term.read_text()
    assert not (tmp_path / "dest" / VERIFIED_MARKER).exists()
