from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from e2e.pki import LocalPKI


def test_certificates_chain_to_the_ca_with_kubernetes_identities(tmp_path):
    pki = LocalPKI(tmp_path)
    server = pki.issue("apiserver", "kube-apiserver", server_names=("localhost",), server_ips=("127.0.0.1",))
    client = pki.issue("node-a", "system:node:a", "system:nodes")
    ca = x509.load_pem_x509_certificate(pki.ca.cert.read_bytes())
    s = x509.load_pem_x509_certificate(server.cert.read_bytes())
    c = x509.load_pem_x509_certificate(client.cert.read_bytes())
    for cert in (s, c):
        cert.verify_directly_issued_by(ca)
    sans = s.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in sans.get_values_for_type(x509.DNSName)
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert ExtendedKeyUsageOID.SERVER_AUTH in s.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert c.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "system:node:a"
    assert c.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "system:nodes"
    assert oct(client.key.stat().st_mode & 0o777) == "0o600"
    # Issuing again reuses what exists (idempotent `up`).
    assert pki.issue("node-a", "system:node:a", "system:nodes").cert.read_bytes() == client.cert.read_bytes()
