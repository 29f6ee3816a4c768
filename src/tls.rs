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

/// Reads a regular file of at most `max_bytes` (never a device or a pipe, which
/// could block or never end).
fn read_file_bounded(path: &Path, max_bytes: u64) -> Result<Vec<u8>, TlsError> {
    use std::io::Read;
    let io = |source| TlsError::Io {
        path: path.to_path_buf(),
        source,
    };
    let invalid = |what: String| io(std::io::Error::new(std::io::ErrorKind::InvalidInput, what));
    let file = std::fs::File::open(path).map_err(io)?;
    let meta = file.metadata().map_err(io)?;
    if !meta.is_file() {
        return Err(invalid("not a regular file".to_owned()));
    }
    if meta.len() > max_bytes {
        return Err(invalid(format!(
            "{} bytes, more than the {max_bytes} allowed",
            meta.len()
        )));
    }
    let mut bytes = Vec::new();
    file.take(max_bytes + 1)
        .read_to_end(&mut bytes)
        .map_err(io)?;
    if bytes.len() as u64 > max_bytes {
        return Err(invalid(format!("more than the {max_bytes} bytes allowed")));
    }
    Ok(bytes)
}

/// [`load_certs`] from a regular file of at most `max_bytes`.
pub fn load_certs_bounded(
    path: &Path,
    max_bytes: u64,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    certs_from_pem_bytes(&read_file_bounded(path, max_bytes)?, path)
}

/// [`load_key`] from a regular file of at most `max_bytes`.
pub fn load_key_bounded(path: &Path, max_bytes: u64) -> Result<PrivateKeyDer<'static>, TlsError> {
    key_from_pem_bytes(&read_file_bounded(path, max_bytes)?, path)
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

/// Server configuration for the admin endpoint: TLS 1.3 and 1.2, a client certificate
/// OPTIONAL (read-only paths serve any TLS client) but, when presented, verified against
/// `client_ca` (a certificate from another CA fails the handshake). Whether a request may
/// change the switch is decided per request (`admin::allowed`). No ALPN: HTTP/1.1.
pub fn admin_server_config(
    client_ca: &[CertificateDer<'static>],
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let roots = root_store(client_ca, "operator client")?;
    let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider())
        .allow_unauthenticated()
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

/// Most names [`certificate_names`] returns: a certificate carrying more is read no
/// further (an operator name is expected among the first).
pub const CERTIFICATE_NAMES_MAX: usize = 64;

/// The names a verified certificate carries: its subject common names, then its DNS
/// subject alternative names (at most [`CERTIFICATE_NAMES_MAX`], empty ones skipped).
/// What an allow-list of operator names is compared with.
pub fn certificate_names(cert: &CertificateDer<'_>) -> Result<Vec<String>, IdentityError> {
    let (_, x509) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| IdentityError::Unparseable(e.to_string()))?;
    let mut names = Vec::new();
    for cn in x509.subject().iter_common_name() {
        let cn = cn
            .as_str()
            .map_err(|e| IdentityError::Unparseable(format!("subject common name: {e}")))?;
        names.push(cn);
    }
    let san = x509
        .subject_alternative_name()
        .map_err(|e| IdentityError::Unparseable(format!("subject alternative name: {e}")))?;
    if let Some(ext) = san {
        names.extend(
            ext.value
                .general_names
                .iter()
                .filter_map(|name| match name {
                    GeneralName::DNSName(dns) => Some(*dns),
                    _ => None,
                }),
        );
    }
    Ok(names
        .into_iter()
        .filter(|n| !n.is_empty())
        .take(CERTIFICATE_NAMES_MAX)
        .map(str::to_owned)
        .collect())
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

/// TLS configurations of the switch: towards acquirers and towards banks.
#[derive(Clone)]
pub struct TlsSetup {
    /// Server side, requiring client certificates from the configured CA.
    pub server: Arc<ServerConfig>,
    /// Client side, presenting the switch's client certificate to banks.
    pub client: Arc<ClientConfig>,
}

impl TlsSetup {
    /// Loads the certificate files named in the config (what `check-config` and a
    /// reload read too).
    pub fn from_files(files: &crate::config::TlsFiles) -> Result<TlsSetup, TlsError> {
        let ca = load_certs(&files.ca_file)?;
        let crls = match &files.crl_file {
            Some(path) => load_crls(path)?,
            None => Vec::new(),
        };
        let server = server_config_with_crls(
            &ca,
            load_certs(&files.cert_file)?,
            load_key(&files.key_file)?,
            crls,
        )?;
        let client = client_config(
            &ca,
            load_certs(&files.client_cert_file)?,
            load_key(&files.client_key_file)?,
        )?;
        Ok(TlsSetup { server, client })
    }
}
