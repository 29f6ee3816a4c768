//! Mutual TLS for acquirer links: loading PEM material, building rustls configurations and
//! reading the institution identity out of a peer certificate.
//!
//! Exactly one crypto provider (aws-lc-rs) is used, and every configuration is built with
//! [`provider()`] rather than the process default: with two providers in the dependency tree
//! `ServerConfig::builder()` panics, and an explicit provider makes that impossible.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig, SupportedProtocolVersion};
use x509_parser::extensions::GeneralName;

/// Versions offered and accepted on both sides: TLS 1.3 preferred, TLS 1.2 for older acquirer
/// stacks. Nothing older exists in rustls.
static PROTOCOL_VERSIONS: &[&SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

/// The single crypto provider (aws-lc-rs) used by every configuration in the process.
///
/// Cached so that all configurations share one provider value.
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
        .clone()
}

// === errors ===

/// Why TLS material could not be loaded or a configuration could not be built.
///
/// These are configuration errors: they happen at startup or on reload, never per message.
/// `path` is the file that was read, or the origin label given to the `parse_*_pem` functions.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The PEM text held no `CERTIFICATE` section.
    #[error("{}: no CERTIFICATE section found", path.display())]
    NoCertificates { path: PathBuf },
    /// The PEM text held no `X509 CRL` section.
    #[error("{}: no X509 CRL section found", path.display())]
    NoCrls { path: PathBuf },
    /// The PEM text held no PKCS#8, SEC1 or PKCS#1 private key section.
    #[error("{}: no PRIVATE KEY section found (PKCS#8, SEC1 or PKCS#1)", path.display())]
    NoKey { path: PathBuf },
    /// The PEM text was malformed. `detail` never quotes file content (it may be a key).
    #[error("{}: malformed PEM: {detail}", path.display())]
    Pem { path: PathBuf, detail: String },
    /// A trust anchor list was empty, so no peer could ever be authenticated.
    #[error("no trust anchors given for verifying the {role} certificate")]
    NoTrustAnchors { role: &'static str },
    /// rustls refused the material (bad CA certificate, key not matching the chain, ...).
    #[error("TLS configuration rejected: {0}")]
    Rustls(#[from] rustls::Error),
    /// The peer certificate verifier could not be built.
    #[error("cannot build certificate verifier: {0}")]
    Verifier(String),
}

/// Describes a PEM error without echoing the offending bytes, which may be key material.
fn pem_detail(error: &pem::Error) -> String {
    match error {
        pem::Error::MissingSectionEnd { .. } => "a section has no END line".to_owned(),
        pem::Error::IllegalSectionStart { .. } => "a BEGIN line is malformed".to_owned(),
        pem::Error::Base64Decode(_) => "a section body is not valid base64".to_owned(),
        pem::Error::Io(e) => format!("read failed: {e}"),
        pem::Error::NoItemsFound => "no PEM sections".to_owned(),
        pem::Error::SectionTooLarge => "a section exceeds 256 MB".to_owned(),
        // Newer variants: do not risk echoing content.
        _ => "unrecognised PEM error".to_owned(),
    }
}

// === loading PEM ===

fn read_file(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Reads every certificate in a PEM file, leaf first (the order the file gives).
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    certs_from_pem_bytes(&read_file(path)?, path)
}

/// Reads every certificate revocation list (`X509 CRL` sections) in a PEM file.
pub fn load_crls(
    path: &Path,
) -> Result<Vec<rustls::pki_types::CertificateRevocationListDer<'static>>, TlsError> {
    use rustls::pki_types::pem::PemObject;
    let bytes = read_file(path)?;
    let crls = rustls::pki_types::CertificateRevocationListDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            path: path.to_path_buf(),
            detail: pem_detail(&e),
        })?;
    if crls.is_empty() {
        return Err(TlsError::NoCrls {
            path: path.to_path_buf(),
        });
    }
    Ok(crls)
}

/// Reads the single private key in a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    key_from_pem_bytes(&read_file(path)?, path)
}

/// Parses every certificate in `pem`; `origin` names the source in errors.
pub fn parse_certs_pem(pem: &str, origin: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    certs_from_pem_bytes(pem.as_bytes(), Path::new(origin))
}

/// Parses the single private key in `pem`; `origin` names the source in errors.
pub fn parse_key_pem(pem: &str, origin: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
    key_from_pem_bytes(pem.as_bytes(), Path::new(origin))
}

fn certs_from_pem_bytes(
    bytes: &[u8],
    origin: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            path: origin.to_path_buf(),
            detail: pem_detail(&e),
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificates {
            path: origin.to_path_buf(),
        });
    }
    Ok(certs)
}

/// Exactly one key is accepted: with two, which one pairs with the certificate is a guess.
fn key_from_pem_bytes(bytes: &[u8], origin: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem_error = |detail: String| TlsError::Pem {
        path: origin.to_path_buf(),
        detail,
    };
    let mut keys = PrivateKeyDer::pem_slice_iter(bytes);
    let key = match keys.next() {
        None => {
            return Err(TlsError::NoKey {
                path: origin.to_path_buf(),
            })
        }
        Some(key) => key.map_err(|e| pem_error(pem_detail(&e)))?,
    };
    if keys.next().is_some() {
        return Err(pem_error(
            "more than one private key; expected exactly one".to_owned(),
        ));
    }
    Ok(key)
}

// === configurations ===

fn root_store(
    anchors: &[CertificateDer<'static>],
    role: &'static str,
) -> Result<Arc<RootCertStore>, TlsError> {
    if anchors.is_empty() {
        return Err(TlsError::NoTrustAnchors { role });
    }
    let mut roots = RootCertStore::empty();
    for anchor in anchors {
        roots.add(anchor.clone())?;
    }
    Ok(Arc::new(roots))
}

/// Server configuration for acquirer links: TLS 1.3 and 1.2, and a client certificate chaining
/// to one of `client_ca` is REQUIRED (anonymous clients fail the handshake). No ALPN.
///
/// `chain` is the server's certificate chain, leaf first; `key` its private key.
pub fn server_config(
    client_ca: &[CertificateDer<'static>],
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<Arc<ServerConfig>, TlsError> {
    server_config_with_crls(client_ca, chain, key, Vec::new())
}

/// [`server_config`] refusing client certificates that `crls` revoke (a client
/// certificate whose issuer has no CRL among them is not checked for revocation).
pub fn server_config_with_crls(
    client_ca: &[CertificateDer<'static>],
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    crls: Vec<rustls::pki_types::CertificateRevocationListDer<'static>>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let roots = root_store(client_ca, "client")?;
    let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider())
        .with_crls(crls)
        .allow_unknown_revocation_status()
        .build()
        .map_err(|e| TlsError::Verifier(e.to_string()))?;
    let config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(PROTOCOL_VERSIONS)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)?;
    Ok(Arc::new(config))
}

/// Client configuration presenting `chain`/`key` (mutual TLS) and trusting `server_ca`.
/// TLS 1.3 and 1.2.
pub fn client_config(
    server_ca: &[CertificateDer<'static>],
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<Arc<ClientConfig>, TlsError> {
    let config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(PROTOCOL_VERSIONS)?
        .with_root_certificates(root_store(server_ca, "server")?)
        .with_client_auth_cert(chain, key)?;
    Ok(Arc::new(config))
}

/// Client configuration without any client certificate. The switch refuses such clients;
/// tests use this to prove it.
pub fn client_config_anonymous(
    server_ca: &[CertificateDer<'static>],
) -> Result<Arc<ClientConfig>, TlsError> {
    let config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(PROTOCOL_VERSIONS)?
        .with_root_certificates(root_store(server_ca, "server")?)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

// === peer identity ===

/// Which part of a verified client certificate names the institution.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum IdentitySource {
    /// The subject common name (CN).
    CommonName,
    /// The first DNS name in the subject alternative names.
    DnsSan,
    /// The first URI in the subject alternative names.
    UriSan,
}

impl IdentitySource {
    /// The configuration spelling: `common-name`, `dns-san` or `uri-san`.
    pub const fn as_str(self) -> &'static str {
        match self {
            IdentitySource::CommonName => "common-name",
            IdentitySource::DnsSan => "dns-san",
            IdentitySource::UriSan => "uri-san",
        }
    }
}

impl fmt::Display for IdentitySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why no identity could be read from a peer. The peer is to blame: close the connection.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum IdentityError {
    /// The connection carries no client certificate (should not happen once the verifier
    /// requires one, but the handshake may not have completed).
    #[error("peer presented no certificate")]
    NoPeerCertificate,
    /// The certificate, or the requested field of it, could not be decoded.
    #[error("peer certificate cannot be parsed: {0}")]
    Unparseable(String),
    /// The certificate has no (non-empty) value for the configured identity source.
    #[error("peer certificate has no {0} identity")]
    Missing(IdentitySource),
}

/// The identity string of a peer certificate: the subject CN, or the first DNS SAN, or the
/// first URI SAN, as `source` selects. Empty values count as missing.
///
/// The certificate must already have been verified; this only reads it.
pub fn peer_identity(
    cert: &CertificateDer<'_>,
    source: IdentitySource,
) -> Result<String, IdentityError> {
    let (_, x509) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| IdentityError::Unparseable(e.to_string()))?;
    let value = match source {
        IdentitySource::CommonName => match x509.subject().iter_common_name().next() {
            None => None,
            Some(cn) => Some(
                cn.as_str()
                    .map_err(|e| IdentityError::Unparseable(format!("subject common name: {e}")))?,
            ),
        },
        IdentitySource::DnsSan | IdentitySource::UriSan => {
            let san = x509.subject_alternative_name().map_err(|e| {
                IdentityError::Unparseable(format!("subject alternative name: {e}"))
            })?;
            san.and_then(|ext| {
                ext.value
                    .general_names
                    .iter()
                    .find_map(|name| match (source, name) {
                        (IdentitySource::DnsSan, GeneralName::DNSName(dns)) => Some(*dns),
                        (IdentitySource::UriSan, GeneralName::URI(uri)) => Some(*uri),
                        _ => None,
                    })
            })
        }
    };
    match value {
        Some(value) if !value.is_empty() => Ok(value.to_owned()),
        _ => Err(IdentityError::Missing(source)),
    }
}

/// The identity of the client on a server-side connection (for tokio-rustls:
/// `stream.get_ref().1`), read from its leaf certificate.
pub fn connection_identity(
    conn: &rustls::ServerConnection,
    source: IdentitySource,
) -> Result<String, IdentityError> {
    let leaf = conn
        .peer_certificates()
        .and_then(|chain| chain.first())
        .ok_or(IdentityError::NoPeerCertificate)?;
    peer_identity(leaf, source)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::certs::{DevCa, Issued};
    use rustls::pki_types::ServerName;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};
    use tokio_rustls::{TlsAcceptor, TlsConnector};

    /// What each side saw of one connection attempt.
    pub(crate) struct Outcome {
        /// The client identity per source as the server read it, or the server's handshake
        /// error.
        pub server: Result<Vec<Result<String, IdentityError>>, std::io::Error>,
        /// Whether the client received the server's greeting after its handshake.
        pub client_got_greeting: bool,
    }

    const GREETING: &[u8] = b"hello";

    /// Runs one connection over 127.0.0.1 and reports what both sides saw. The server reads
    /// each of `sources` from the client certificate, then sends a greeting. Both sides are
    /// awaited to completion: no sleeps, no timeouts.
    pub(crate) async fn handshake(
        server: Arc<ServerConfig>,
        client: Arc<ClientConfig>,
        sources: &[IdentitySource],
    ) -> Outcome {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let sources = sources.to_vec();
        let server_task = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.expect("accept");
            let mut tls = TlsAcceptor::from(server).accept(tcp).await?;
            let conn = tls.get_ref().1;
            let ids = sources
                .iter()
                .map(|&s| connection_identity(conn, s))
                .collect::<Vec<_>>();
            tls.write_all(GREETING).await?;
            tls.shutdown().await?;
            Ok::<_, std::io::Error>(ids)
        });

        let tcp = TcpStream::connect(addr).await.expect("connect");
        let name = ServerName::try_from("localhost").expect("server name");
        let client_got_greeting = match TlsConnector::from(client).connect(name, tcp).await {
            Err(_) => false,
            Ok(mut tls) => {
                let mut buf = Vec::new();
                // The server closes after the greeting, or after an alert when it refused us.
                let read = tls.read_to_end(&mut buf).await;
                read.is_ok() && buf == GREETING
            }
        };
        let server = server_task.await.expect("server task");
        Outcome {
            server,
            client_got_greeting,
        }
    }

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
}
