"""TLS and mutual TLS on both services and the internal token of the encoder API, with certificates made here
at test time (a CA, a server certificate for 127.0.0.1/localhost, a client certificate for the decoder)."""
from __future__ import annotations

import datetime
import ipaddress
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service_harness import CONFIG, REPO, SMALL_FRAMES, free_port, metric_value, png_bytes, wait_for
from worldstream.serving.processes import ServiceProcess
from worldstream.serving.security import ChannelTLS
from worldstream.v1 import encoder_pb2, encoder_pb2_grpc, session_pb2, session_pb2_grpc

IMAGE = png_bytes(seed=31)
Code = grpc.StatusCode
TOKEN = "0123456789abcdef" * 4


# ---- certificates -------------------------------------------------------------------------------------------------

def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _builder(subject: str, issuer: str, public_key) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.timezone.utc)
    return (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(_name(issuer))
            .public_key(public_key).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1)))


def _write(folder: Path, stem: str, key, certificate: x509.Certificate) -> tuple[Path, Path]:
    cert_path, key_path = folder / f"{stem}.pem", folder / f"{stem}.key"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def make_pki(folder: Path, ca_name: str = "worldstream test CA") -> dict[str, Path]:
    """ca.pem; server.pem/.key (127.0.0.1, localhost; serverAuth); client.pem/.key (clientAuth)."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (_builder(ca_name, ca_name, ca_key.public_key())
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                       crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    paths = {"ca": _write(folder, "ca", ca_key, ca)[0]}
    for stem, usage in (("server", ExtendedKeyUsageOID.SERVER_AUTH), ("client", ExtendedKeyUsageOID.CLIENT_AUTH)):
        key = ec.generate_private_key(ec.SECP256R1())
        certificate = (_builder(f"worldstream {stem}", ca_name, key.public_key())
                       .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                       .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
                       .add_extension(x509.SubjectAlternativeName([
                           x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
                       .sign(ca_key, hashes.SHA256()))
        paths[stem], paths[f"{stem}_key"] = _write(folder, stem, key, certificate)
    return paths


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("pki")
    paths = make_pki(folder)
    paths["token"] = folder / "token"
    paths["token"].write_text(TOKEN + "\n")
    paths["other"] = make_pki(tmp_path_factory.mktemp("other-pki"), "another CA")  # trusted by nobody here
    return paths


# ---- the two services, secured --------------------------------------------------------------------------------------

class SecureServices:
    def __init__(self, pki: dict[str, Path], log_dir: Path):
        self.pki = pki
        self.encoder_port, self.encoder_metrics_port = free_port(), free_port()
        self.decoder_port, self.decoder_metrics_port = free_port(), free_port()
        self.encoder_address = f"127.0.0.1:{self.encoder_port}"
        self.address = f"127.0.0.1:{self.decoder_port}"
        common = ["--config", CONFIG, *SMALL_FRAMES, "--warmup-blocks", "0", "--tls-cert", str(pki["server"]),
                  "--tls-key", str(pki["server_key"])]
        self.encoder = ServiceProcess("encoder", [
            *common, "--port", str(self.encoder_port), "--metrics-port", str(self.encoder_metrics_port),
            "--tls-client-ca", str(pki["ca"]), "--token-file", str(pki["token"])], log_dir / "encoder.log",
            tls=self.tls(client_certificate=True))
        self.decoder = ServiceProcess("decoder", [
            *common, "--port", str(self.decoder_port), "--metrics-port", str(self.decoder_metrics_port),
            "--encoder-address", self.encoder_address, "--encoder-tls-ca", str(pki["ca"]),
            "--encoder-tls-cert", str(pki["client"]), "--encoder-tls-key", str(pki["client_key"]),
            "--encoder-token-file", str(pki["token"])], log_dir / "decoder.log", tls=self.tls())

    def tls(self, client_certificate: bool = False) -> ChannelTLS:
        if client_certificate:
            return ChannelTLS(self.pki["ca"], self.pki["client"], self.pki["client_key"])
        return ChannelTLS(self.pki["ca"])


@pytest.fixture(scope="module")
def secure(pki, tmp_path_factory) -> Iterator[SecureServices]:
    services = SecureServices(pki, tmp_path_factory.mktemp("tls"))
    try:
        services.encoder.start(services.encoder_port, 90)
        services.decoder.start(services.decoder_port, 90)
        yield services
    finally:
        services.decoder.stop()
        services.encoder.stop()


def channel(address: str, tls: ChannelTLS | None) -> grpc.Channel:
    own = [("grpc.use_local_subchannel_pool", 1)]  # a fresh connection: a handshake of its own
    if tls is None:
        return grpc.insecure_channel(address, options=own)
    return grpc.secure_channel(address, tls.credentials(), options=own)


def health_code(address: str, tls: ChannelTLS | None) -> Code:
    with channel(address, tls) as ch:
        try:
            health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
            return Code.OK
        except grpc.RpcError as e:
            return e.code()


def test_session_over_tls_through_a_mutual_tls_encoder(secure):
    """Client -TLS-> decoder -mutual TLS + token-> encoder: a whole session."""
    requests = [session_pb2.SessionRequest(start=session_pb2.StartSession(image=IMAGE, max_blocks=2)),
                session_pb2.SessionRequest(action=session_pb2.Action(keys=["forward"])),
                session_pb2.SessionRequest(action=session_pb2.Action(keys=["left"]))]
    with channel(secure.address, secure.tls()) as ch:
        responses = list(session_pb2_grpc.WorldSessionServiceStub(ch).Session(iter(requests), timeout=120))
    kinds = [response.WhichOneof("response") for response in responses]
    assert kinds == ["info", *["block_frames", "block_frames", "block"] * 2, "end"]
    assert responses[-1].end.reason == session_pb2.END_REASON_MAX_BLOCKS


def test_tls_servers_refuse_plaintext_and_unknown_cas(secure, pki):
    for address in (secure.address, secure.encoder_address):
        assert health_code(address, None) == Code.UNAVAILABLE
        assert health_code(address, ChannelTLS(pki["other"]["ca"])) == Code.UNAVAILABLE  # server not trusted
    assert health_code(secure.address, secure.tls()) == Code.OK


def test_encoder_requires_a_client_certificate_of_its_ca(secure, pki):
    assert health_code(secure.encoder_address, secure.tls()) == Code.UNAVAILABLE  # no client certificate
    stranger = ChannelTLS(pki["ca"], pki["other"]["client"], pki["other"]["client_key"])
    assert health_code(secure.encoder_address, stranger) == Code.UNAVAILABLE  # signed by another CA
    assert health_code(secure.encoder_address, secure.tls(client_certificate=True)) == Code.OK  # probes need no token


@pytest.mark.parametrize("metadata", [(), (("authorization", "Bearer " + "f" * 64),),
                                      (("authorization", TOKEN),)], ids=["no-token", "wrong-token", "no-bearer"])
def test_encode_without_the_token_is_unauthenticated(secure, metadata):
    """The token is checked before the first request is read: the call ends at once with UNAUTHENTICATED."""
    counted = metric_value(secure.encoder_metrics_port, "worldstream_encoder_errors_total",
                           {"code": "UNAUTHENTICATED"})
    request = encoder_pb2.EncodeRequest(image=encoder_pb2.ImageConditionRequest(
        session_id="intruder", mode="universal", image=IMAGE, height=32, width=64, max_blocks=1,
        initial_credits=1))
    with channel(secure.encoder_address, secure.tls(client_certificate=True)) as ch:
        with pytest.raises(grpc.RpcError) as caught:
            list(encoder_pb2_grpc.ConditionEncoderServiceStub(ch).Encode(iter([request]), metadata=metadata,
                                                                         timeout=30))
    assert caught.value.code() == Code.UNAUTHENTICATED and "token" in caught.value.details()
    wait_for(lambda: metric_value(secure.encoder_metrics_port, "worldstream_encoder_errors_total",
                                  {"code": "UNAUTHENTICATED"}) == counted + 1, 10, "the refusal to be counted")


def health_command(*args: str) -> int:
    return subprocess.run([sys.executable, "-m", "worldstream.cli", "health", *args], cwd=REPO,
                          capture_output=True, timeout=60).returncode


def test_health_command_over_tls(secure, pki):
    assert health_command(secure.address, "--tls-ca", str(pki["ca"])) == 0
    assert health_command(secure.address) == 1  # plaintext
    assert health_command(secure.encoder_address, "--tls-ca", str(pki["ca"]), "--tls-cert", str(pki["client"]),
                          "--tls-key", str(pki["client_key"])) == 0
    assert health_command(secure.encoder_address, "--tls-ca", str(pki["ca"])) == 1  # no client certificate


@pytest.mark.parametrize("flags, message", [
    (["--host", "0.0.0.0"], "needs --token-file or mutual TLS"),
    (["--host", "0.0.0.0", "--tls-cert", "{server}", "--tls-key", "{server_key}"], "needs --token-file or mutual"),
    (["--token-file", "{short}"], "at least 16 printable ASCII characters"),
    (["--tls-cert", "{server}"], "needs both --tls-cert and --tls-key"),
    (["--tls-cert", "{server}", "--tls-key", "{missing}"], "cannot read"),
], ids=["open-host", "tls-without-client-auth", "weak-token", "cert-without-key", "missing-key"])
def test_encoder_refuses_insecure_or_broken_settings(pki, tmp_path, flags, message):
    """The encoder API is internal: beyond loopback it needs a token or mutual TLS. Bad security flags stop a
    service before it listens or loads anything (exit status 2)."""
    (tmp_path / "short").write_text("secret")
    paths = {**{key: str(value) for key, value in pki.items() if isinstance(value, Path)},
             "short": str(tmp_path / "short"), "missing": str(tmp_path / "missing.key")}
    result = subprocess.run([sys.executable, "-m", "worldstream.cli", "serve", "encoder", "--config", CONFIG,
                             "--port", str(free_port()), "--metrics-port", str(free_port()),
                             *[flag.format(**paths) for flag in flags]],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr
