"""TLS material, the Envoy side of a secure and health-checked EPP, and what binds where."""

from __future__ import annotations

import pytest

from extproc.cli.main import main
from extproc.devstack import envoy_config
from extproc.server.runner import ServeOptions
from extproc.server.tls import load_certificate, self_signed, write_certificate
from pickers.framework.errors import ConfigError
from tests.unit.test_envoy_config import validate


def _epp_cluster(cfg: dict) -> dict:
    return next(c for c in cfg["static_resources"]["clusters"] if c["name"] == "llm-epp")


def test_self_signed_certificate_covers_loopback_and_hides_its_key():
    from cryptography import x509

    cert = self_signed(hosts=("epp.llm.svc",))
    parsed = x509.load_pem_x509_certificate(cert.cert_pem)
    sans = parsed.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"localhost", "epp.llm.svc"} <= set(sans.get_values_for_type(x509.DNSName))
    assert b"PRIVATE KEY" in cert.key_pem
    assert "PRIVATE" not in repr(cert) and cert.key_pem.decode() not in repr(cert)


def test_certificate_directory_round_trips_with_a_private_key_file(tmp_path):
    write_certificate(self_signed(), tmp_path)
    assert (tmp_path / "tls.key").stat().st_mode & 0o077 == 0
    assert load_certificate(tmp_path).cert_pem.startswith(b"-----BEGIN CERTIFICATE")


def test_missing_certificate_file_names_the_file(tmp_path):
    with pytest.raises(ConfigError, match="tls.crt"):
        load_certificate(tmp_path)


def test_cert_path_without_secure_serving_is_a_configuration_error(tmp_path, capsys):
    assert main(["serve", "--endpoints", str(tmp_path / "x.yaml"), "--cert-path", str(tmp_path)]) == 2
    assert "--cert-path needs --secure-serving" in capsys.readouterr().err


def test_epp_cluster_is_health_checked_without_panic_mode():
    cfg = envoy_config.render(envoy_config.GatewaySettings(listen_port=1, epp_port=2, admin_port=3, epp_health_port=4))
    epp = _epp_cluster(cfg)
    assert epp["common_lb_config"]["healthy_panic_threshold"]["value"] == 0
    assert epp["health_checks"][0]["grpc_health_check"]["service_name"] == "envoy.service.ext_proc.v3.ExternalProcessor"
    assert epp["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["health_check_config"] == {"port_value": 4}
    assert epp["outlier_detection"]["consecutive_local_origin_failure"] == 1


def test_tls_to_the_epp_keeps_health_checks_plaintext(tmp_path):
    write_certificate(self_signed(), tmp_path)
    settings = envoy_config.GatewaySettings(
        listen_port=1, epp_port=2, admin_port=3, epp_tls=True, epp_tls_ca=str(tmp_path / "tls.crt"), epp_tls_sni="localhost"
    )
    cfg = envoy_config.render(settings)
    epp = _epp_cluster(cfg)
    tls = epp["transport_socket"]["typed_config"]
    assert tls["common_tls_context"]["alpn_protocols"] == ["h2"]
    assert tls["common_tls_context"]["validation_context"]["trusted_ca"]["filename"].endswith("tls.crt")
    match = epp["health_checks"][0]["transport_socket_match_criteria"]
    assert epp["transport_socket_matches"][0]["match"] == match
    validate(cfg, tmp_path)


def test_admin_and_debug_endpoints_bind_to_loopback_by_default():
    cfg = envoy_config.render(envoy_config.GatewaySettings(listen_port=1, epp_port=2, admin_port=3, listen_address="0.0.0.0"))
    assert cfg["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"
    assert ServeOptions().admin_address == "127.0.0.1"
