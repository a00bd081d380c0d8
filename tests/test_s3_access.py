"""S3 access for a tenant's settings (issue 13): which Secret keys may be read as credentials (the
defaults, or keys the Secret lists in its annotation; the CRD refuses junk key names), and the CA
bundle files written for boto3 (bounded in count and size, never pruned while in use, a PEM
without a certificate refused). No message names a Secret value or the CA bundle's content."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest
from pydantic import ValidationError

from slmfleet.api.config import S3EndpointRule
from slmfleet.api.modelrollout import ConfigMapDataset
from slmfleet.api.smallmodel import ConfigMapKey, S3Settings, SecretKeys
from slmfleet.controller import s3_access
from slmfleet.controller.s3_access import (
    CREDENTIAL_KEYS_ANNOTATION,
    MAX_ANNOTATED_KEYS,
    MAX_CA_BYTES,
    S3AccessError,
    _CaFiles,
    s3_client_for,
)
from tests.test_handlers_evaluations import FakeClient

MINIO = (S3EndpointRule(host="minio.storage.svc"),)
VALUES = {"AWS_ACCESS_KEY_ID": "MARKER-DEFAULT-ID", "AWS_SECRET_ACCESS_KEY": "MARKER-DEFAULT-SECRET",
          "db-user": "MARKER-DB-USER", "db-password": "MARKER-DB-PASSWORD",
          "s3.id": "MARKER-S3-ID", "s3.secret": "MARKER-S3-SECRET"}
PEM = "-----BEGIN CERTIFICATE-----\nMIIB{}\n-----END CERTIFICATE-----\n"


def settings(**keys: str) -> S3Settings:
    return S3Settings.model_validate({"endpoint": "https://minio.storage.svc:9000",
                                      "credentialsSecret": {"name": "creds", **keys}})


def client_for(s3: S3Settings, annotations: dict[str, str] | None = None) -> object:
    client = FakeClient(secrets={("ns", "creds"): VALUES}, annotations=annotations)
    return asyncio.run(s3_client_for(client, "ns", s3, MINIO))  # type: ignore[arg-type]


def refusal(s3: S3Settings, annotations: dict[str, str] | None = None) -> S3AccessError:
    with pytest.raises(S3AccessError) as info:
        client_for(s3, annotations)
    assert info.value.reason == "CredentialsNotAllowed"
    assert "MARKER" not in str(info.value), "a Secret value in the message"
    assert len(str(info.value)) < 400
    return info.value


# --- which keys of the Secret are read ---------------------------------------------------------------


def test_the_default_keys_need_no_annotation():
    assert client_for(settings()) is not None
    assert client_for(settings(accessKeyIdKey="AWS_ACCESS_KEY_ID")) is not None


def test_other_keys_are_refused_unless_the_secret_lists_them():
    for keys, fields in (({"accessKeyIdKey": "db-user", "secretAccessKeyKey": "db-password"},
                          "accessKeyIdKey and secretAccessKeyKey"),
                         ({"secretAccessKeyKey": "db-password"}, "secretAccessKeyKey"),
                         # the secret access key would go out in the clear as the access key id
                         ({"accessKeyIdKey": "AWS_SECRET_ACCESS_KEY"}, "accessKeyIdKey")):
        error = refusal(settings(**keys))
        assert CREDENTIAL_KEYS_ANNOTATION in str(error) and f"named by {fields} in" in str(error)
    # Listed: read. Listed but not the key asked for, or listed past the bound: refused.
    keys = {"accessKeyIdKey": "s3.id", "secretAccessKeyKey": "s3.secret"}
    assert client_for(settings(**keys), {CREDENTIAL_KEYS_ANNOTATION: " s3.id ,s3.secret"}) is not None
    error = refusal(settings(**keys), {CREDENTIAL_KEYS_ANNOTATION: "s3.id, db-password"})
    assert "named by secretAccessKeyKey in" in str(error)
    many = ",".join([f"k{i}" for i in range(MAX_ANNOTATED_KEYS)] + ["s3.id", "s3.secret"])
    refusal(settings(**keys), {CREDENTIAL_KEYS_ANNOTATION: many})
    refusal(settings(**keys), {CREDENTIAL_KEYS_ANNOTATION: "s3.id s3.secret"})  # one entry, not a key name


def test_the_secret_is_checked_before_its_keys():
    """An unlabelled Secret is refused as such whatever its annotations say."""
    client = FakeClient(secrets={("ns", "creds"): VALUES}, labels={},
                        annotations={CREDENTIAL_KEYS_ANNOTATION: "db-user,db-password"})
    s3 = settings(accessKeyIdKey="db-user", secretAccessKeyKey="db-password")
    with pytest.raises(S3AccessError, match="not labelled") as info:
        asyncio.run(s3_client_for(client, "ns", s3, MINIO))  # type: ignore[arg-type]
    assert "MARKER" not in str(info.value)


def test_the_schema_refuses_key_names_a_secret_cannot_have():
    for junk in ("", "a/b", "key with spaces", "ключ", "x\ny"):
        for field in ("accessKeyIdKey", "secretAccessKeyKey"):
            with pytest.raises(ValidationError):
                SecretKeys.model_validate({"name": "creds", field: junk})
    assert SecretKeys.model_validate({"name": "creds", "accessKeyIdKey": "s3.id_-X9"}).access_key_id_key == "s3.id_-X9"


def test_the_schema_refuses_configmap_key_names_a_configmap_cannot_have():
    # The CA bundle's key (named in its error messages) and an evaluation dataset's key.
    for junk in ("", "a/b", "key with spaces", "x\ny"):
        with pytest.raises(ValidationError):
            ConfigMapKey.model_validate({"name": "ca", "key": junk})
        with pytest.raises(ValidationError):
            ConfigMapDataset.model_validate({"name": "cases", "key": junk})
    assert ConfigMapKey.model_validate({"name": "ca", "key": "ca-bundle.pem"}).key == "ca-bundle.pem"


# --- CA bundle files ----------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def files(ca: _CaFiles) -> list[Path]:
    assert ca.dir is not None
    return sorted(ca.dir.iterdir())


def test_many_distinct_bundles_leave_at_most_max_files():
    clock = Clock()
    ca = _CaFiles(max_files=8, in_use_seconds=600, clock=clock)
    paths = []
    for i in range(50):
        clock.now += 601  # the earlier ones are no longer in use
        paths.append(ca.path(PEM.format(i), "ConfigMap ns/ca"))
        assert len(files(ca)) <= 8
    assert files(ca) == sorted(Path(p) for p in paths[-8:])
    assert Path(paths[-1]).read_text() == PEM.format(49)
    assert ca.path(PEM.format(49), "ConfigMap ns/ca") == paths[-1], "content-addressed: the same file again"


def test_the_least_recently_used_goes_and_one_in_use_is_never_pruned():
    clock = Clock()
    ca = _CaFiles(max_files=3, in_use_seconds=600, clock=clock)
    a, b, c = (ca.path(PEM.format(x), "ConfigMap ns/ca") for x in "abc")
    clock.now += 700
    assert ca.path(PEM.format("a"), "ConfigMap ns/ca") == a  # a used again: b is the least recent now
    ca.path(PEM.format("d"), "ConfigMap ns/ca")
    assert Path(a).exists() and not Path(b).exists() and Path(c).exists()
    # a, c and d: c is the least recently used but was used 700 s ago; a and d just now.
    ca.path(PEM.format("e"), "ConfigMap ns/ca")
    assert Path(a).exists() and not Path(c).exists()
    # Every file used within the window: none is pruned, the new bundle waits.
    with pytest.raises(S3AccessError, match="in use") as info:
        ca.path(PEM.format("f"), "ConfigMap ns/ca")
    assert "MIIB" not in str(info.value)
    assert Path(a).exists() and len(files(ca)) == 3
    clock.now += 601
    ca.path(PEM.format("f"), "ConfigMap ns/ca")
    assert len(files(ca)) == 3


def test_an_oversized_bundle_or_one_without_a_certificate_is_refused():
    ca = _CaFiles(max_files=3)
    big = PEM.format("A" * MAX_CA_BYTES)
    for pem, why in ((big, "larger than 1 MiB"), ("MARKER-NOT-A-PEM " * 10, "no PEM certificate"),
                     ("-----BEGIN PRIVATE KEY-----\nMARKER\n-----END PRIVATE KEY-----\n", "no PEM certificate")):
        with pytest.raises(S3AccessError, match=why) as info:
            ca.path(pem, "ConfigMap ns/ca key ca.crt")
        assert str(info.value).startswith("ConfigMap ns/ca key ca.crt: ")
        assert "MARKER" not in str(info.value) and "AAAA" not in str(info.value) and len(str(info.value)) < 200
    assert ca.dir is None or files(ca) == []
    assert Path(ca.path(PEM.format("ok"), "ConfigMap ns/ca")).exists()


def test_bundles_written_from_many_threads_stay_bounded():
    ca = _CaFiles(max_files=4, in_use_seconds=0)
    errors: list[BaseException] = []

    def write(n: int) -> None:
        try:
            for i in range(25):
                path = ca.path(PEM.format(f"{n}-{i}"), "ConfigMap ns/ca")
                assert Path(path).name.endswith(".pem")
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(files(ca)) <= 4


def test_the_client_gets_the_bundle_from_the_config_map(monkeypatch):
    ca = _CaFiles(max_files=2)
    monkeypatch.setattr(s3_access, "_CA_FILES", ca)
    seen = {}
    monkeypatch.setattr(s3_access, "s3_client", lambda **kw: seen.update(kw) or object())
    s3 = S3Settings.model_validate({"endpoint": "https://minio.storage.svc:9000",
                                    "caConfigMap": {"name": "ca"}})
    client = FakeClient(config_maps={("ns", "ca"): {"ca.crt": PEM.format("x")}})
    asyncio.run(s3_client_for(client, "ns", s3, MINIO))  # type: ignore[arg-type]
    assert Path(seen["ca_bundle"]).read_text() == PEM.format("x")
    bad = FakeClient(config_maps={("ns", "ca"): {"ca.crt": "MARKER garbage"}})
    with pytest.raises(S3AccessError, match=r"^ConfigMap ns/ca key ca.crt: the CA bundle holds no PEM") as info:
        asyncio.run(s3_client_for(bad, "ns", s3, MINIO))  # type: ignore[arg-type]
    assert "MARKER" not in str(info.value)
