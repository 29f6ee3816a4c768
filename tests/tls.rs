//! TLS set-up and client identities over real handshakes on 127.0.0.1, with
//! certificates made in the test.

use rustls::pki_types::CertificateDer;
use rustls::{ClientConfig, ServerConfig};
use std::path::Path;
use std::sync::Arc;
use switchyard::tls::*;
use switchyard_tools::certs::{DevCa, Issued};
use switchyard_tools::testkit::handshake;

/// The rustls error inside a tokio-rustls I/O error, if that is what it carries.
fn rustls_error(err: &std::io::Error) -> Option<&rustls::Error> {
    err.get_ref()?.downcast_ref::<rustls::Error>()
}

fn server_side(ca: &DevCa) -> Arc<ServerConfig> {
    let issued = ca
        .issue_server(&["localhost", "127.0.0.1"])
        .expect("server cert");
    server_config(
        &[ca.ca_der()],
        issued.chain().unwrap(),
        issued.key().unwrap(),
    )
    .expect("server config")
}

fn client_side(server_ca: &DevCa, issued: &Issued) -> Arc<ClientConfig> {
    client_config(
        &[server_ca.ca_der()],
        issued.chain().unwrap(),
        issued.key().unwrap(),
    )
    .expect("client config")
}

#[tokio::test]
async fn a_revoked_client_certificate_fails_the_handshake() {
    let ca = DevCa::new("switchyard test ca").unwrap();
    let revoked = ca.issue_client("100001").unwrap();
    let valid = ca.issue_client("100002").unwrap();
    let dir = std::env::temp_dir().join(format!("switchyard-crl-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("revoked.crl.pem");
    std::fs::write(&path, ca.revocation_list(&[&revoked]).unwrap()).unwrap();
    let crls = load_crls(&path).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let issued = ca.issue_server(&["localhost"]).unwrap();
    let server = server_config_with_crls(
        &[ca.ca_der()],
        issued.chain().unwrap(),
        issued.key().unwrap(),
        crls,
    )
    .unwrap();
    let refused = handshake(server.clone(), client_side(&ca, &revoked), &[]).await;
    assert!(refused.server.is_err() && !refused.client_got_greeting);
    let accepted = handshake(server, client_side(&ca, &valid), &[]).await;
    assert!(accepted.client_got_greeting);
    let err = load_crls(Path::new("/nonexistent/crl.pem")).unwrap_err();
    assert!(
        err.to_string()
            .starts_with("cannot read /nonexistent/crl.pem"),
        "{err}"
    );
}

#[tokio::test]
async fn mutual_tls_server_sees_client_identity() {
    let ca = DevCa::new("switchyard test ca").unwrap();
    let client = ca.issue_client("100001").unwrap();
    let sources = [IdentitySource::CommonName, IdentitySource::UriSan];
    let outcome = handshake(server_side(&ca), client_side(&ca, &client), &sources).await;
    let ids = outcome.server.expect("server handshake");
    assert_eq!(ids[0].as_deref(), Ok("100001"));
    assert_eq!(ids[1].as_deref(), Ok("urn:switchyard:institution:100001"));
    assert!(outcome.client_got_greeting);
}

#[tokio::test]
async fn dns_san_identity_when_name_is_a_dns_name() {
    let ca = DevCa::new("switchyard test ca").unwrap();
    let client = ca.issue_client("acquirer-a.example").unwrap();
    let sources = [IdentitySource::DnsSan];
    let outcome = handshake(server_side(&ca), client_side(&ca, &client), &sources).await;
    let ids = outcome.server.expect("server handshake");
    assert_eq!(ids[0].as_deref(), Ok("acquirer-a.example"));
}

#[tokio::test]
async fn anonymous_client_is_refused() {
    let ca = DevCa::new("switchyard test ca").unwrap();
    let client = client_config_anonymous(&[ca.ca_der()]).unwrap();
    let outcome = handshake(server_side(&ca), client, &[IdentitySource::CommonName]).await;
    let err = outcome
        .server
        .expect_err("server accepted an anonymous client");
    assert!(
        matches!(
            rustls_error(&err),
            Some(rustls::Error::NoCertificatesPresented)
        ),
        "{err}"
    );
    assert!(!outcome.client_got_greeting);
}

#[tokio::test]
async fn client_from_another_ca_is_refused() {
    let ca = DevCa::new("switchyard test ca").unwrap();
    let rogue_ca = DevCa::new("rogue ca").unwrap();
    let rogue_client = rogue_ca.issue_client("100001").unwrap();
    // The client trusts the real server, but its own certificate is from the rogue CA.
    let client = client_side(&ca, &rogue_client);
    let outcome = handshake(server_side(&ca), client, &[IdentitySource::CommonName]).await;
    let err = outcome
        .server
        .expect_err("server accepted a foreign client certificate");
    assert!(
        matches!(
            rustls_error(&err),
            Some(rustls::Error::InvalidCertificate(
                rustls::CertificateError::UnknownIssuer
            ))
        ),
        "{err}"
    );
    assert!(!outcome.client_got_greeting);
}

#[test]
fn missing_identity_source_is_reported() {
    let ca = DevCa::new("switchyard test ca").unwrap();
    // "100001" is not a valid DNS name (all-numeric), so the certificate has no DNS SAN.
    let client = ca.issue_client("100001").unwrap();
    let leaf = &client.chain().unwrap()[0];
    assert_eq!(
        peer_identity(leaf, IdentitySource::DnsSan),
        Err(IdentityError::Missing(IdentitySource::DnsSan))
    );
    assert_eq!(
        peer_identity(leaf, IdentitySource::CommonName).as_deref(),
        Ok("100001")
    );
}

#[test]
fn garbage_certificate_is_unparseable() {
    let cert = CertificateDer::from(vec![0x30, 0x03, 0x02, 0x01]);
    assert!(matches!(
        peer_identity(&cert, IdentitySource::CommonName),
        Err(IdentityError::Unparseable(_))
    ));
}

#[test]
fn pem_errors_name_the_origin() {
    let err = parse_certs_pem("", "inline:acquirers.ca").unwrap_err();
    assert!(matches!(err, TlsError::NoCertificates { .. }));
    assert!(err.to_string().contains("inline:acquirers.ca"), "{err}");

    let broken = "-----BEGIN CERTIFICATE-----\nAAAA\n";
    let err = parse_certs_pem(broken, "broken.pem").unwrap_err();
    assert!(matches!(err, TlsError::Pem { .. }), "{err}");
    assert!(err.to_string().contains("broken.pem"), "{err}");

    let ca = DevCa::new("ca").unwrap();
    let err = parse_key_pem(&ca.ca_pem(), "cert-not-key.pem").unwrap_err();
    assert!(matches!(err, TlsError::NoKey { .. }), "{err}");

    let issued = ca.issue_client("a").unwrap();
    let two_keys = format!("{}{}", issued.key_pem, issued.key_pem);
    let err = parse_key_pem(&two_keys, "two.key").unwrap_err();
    assert!(matches!(err, TlsError::Pem { .. }), "{err}");
}

#[test]
fn missing_file_names_the_path() {
    let path = Path::new("/nonexistent/switchyard/ca.pem");
    let err = load_certs(path).unwrap_err();
    assert!(matches!(err, TlsError::Io { .. }));
    assert!(
        err.to_string().contains("/nonexistent/switchyard/ca.pem"),
        "{err}"
    );
}

#[test]
fn empty_trust_anchors_are_rejected() {
    let ca = DevCa::new("ca").unwrap();
    let issued = ca.issue_server(&["localhost"]).unwrap();
    let err = server_config(&[], issued.chain().unwrap(), issued.key().unwrap()).unwrap_err();
    assert!(matches!(err, TlsError::NoTrustAnchors { role: "client" }));
}

#[test]
fn identity_source_spellings() {
    for (source, text) in [
        (IdentitySource::CommonName, "common-name"),
        (IdentitySource::DnsSan, "dns-san"),
        (IdentitySource::UriSan, "uri-san"),
    ] {
        assert_eq!(source.to_string(), text);
        let parsed: IdentitySource = serde_json::from_str(&format!("\"{text}\"")).unwrap();
        assert_eq!(parsed, source);
    }
}
