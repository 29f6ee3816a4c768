//! A throw-away development PKI made with rcgen, so that a fresh clone can run the demo and the
//! tests without openssl. Not for production: keys live in memory and on disk unencrypted.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, DnsName, PrivateKeyDer};

use switchyard::tls;

/// How far back certificates are valid from, so that a peer whose clock runs slightly behind
/// still accepts them: one day, in seconds.
const VALIDITY_BACKDATE_S: u64 = 24 * 60 * 60;
/// How long certificates stay valid from now: two years (730 days), in seconds.
const VALIDITY_AHEAD_S: u64 = 730 * 24 * 60 * 60;
/// Prefix of the URI SAN that names an institution in client certificates.
pub const INSTITUTION_URN_PREFIX: &str = "urn:switchyard:institution:";

/// Why a development certificate could not be made, read back or written.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// rcgen refused the parameters (for example a name outside the IA5 character set).
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    /// A certificate or key file could not be written.
    #[error("cannot write {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The generated PEM could not be read back.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// A server certificate needs at least one name.
    #[error("a server certificate needs at least one DNS name or IP address")]
    NoServerNames,
    /// A client common name must also form a valid URN, so only `A-Z a-z 0-9 - . _ :` are
    /// accepted, and it must not be empty.
    #[error("client common name {name:?} is empty or has characters outside A-Z a-z 0-9 - . _ :")]
    InvalidCommonName { name: String },
    /// A CA written by `gen-certs` could not be read back.
    #[error("cannot read the CA in {}: {problem}", dir.display())]
    BadCa { dir: PathBuf, problem: String },
}

/// A certificate and its private key, both as PEM.
pub struct Issued {
    /// The leaf certificate, PEM.
    pub cert_pem: String,
    /// The leaf's PKCS#8 private key, PEM.
    pub key_pem: String,
    /// Its serial number (what a revocation list names).
    pub serial: Vec<u8>,
}

impl std::fmt::Debug for Issued {
    /// Omits the private key so that it never reaches a log.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issued")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

impl Issued {
    /// The certificate chain to present: the leaf only (peers trust the CA directly).
    pub fn chain(&self) -> Result<Vec<CertificateDer<'static>>, CertError> {
        Ok(tls::parse_certs_pem(&self.cert_pem, "issued certificate")?)
    }

    /// The leaf's private key.
    pub fn key(&self) -> Result<PrivateKeyDer<'static>, CertError> {
        Ok(tls::parse_key_pem(&self.key_pem, "issued key")?)
    }
}

/// A throw-away certificate authority for development, tests and the demo. ECDSA P-256 keys;
/// every certificate is valid from one day ago to two years after the CA was made.
pub struct DevCa {
    issuer: Issuer<'static, KeyPair>,
    ca_pem: String,
    ca_der: CertificateDer<'static>,
    /// Validity window of every leaf: the CA's, so no leaf outlives its CA.
    validity: CertificateParams,
}

impl std::fmt::Debug for DevCa {
    /// Shows the CA certificate only, never its key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevCa")
            .field("ca_pem", &self.ca_pem)
            .finish_non_exhaustive()
    }
}

/// Parameters with the validity window set to [now - 1 day, now + 2 years].
fn params_valid_from_now() -> CertificateParams {
    // A clock before 1970 is a broken machine; certificates then start at the epoch.
    let now = Duration::from_millis(switchyard::clock::unix_ms());
    let epoch = rcgen::date_time_ymd(1970, 1, 1);
    let mut params = CertificateParams::default();
    params.not_before = epoch + now.saturating_sub(Duration::from_secs(VALIDITY_BACKDATE_S));
    params.not_after = epoch + now + Duration::from_secs(VALIDITY_AHEAD_S);
    params
}

fn common_name(name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    dn
}

impl DevCa {
    /// A new self-signed CA whose subject CN is `name`.
    pub fn new(name: &str) -> Result<DevCa, CertError> {
        let validity = params_valid_from_now();
        let mut params = validity.clone();
        params.distinguished_name = common_name(name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let certified = CertifiedIssuer::self_signed(params.clone(), KeyPair::generate()?)?;
        let key = KeyPair::from_pem(&certified.key().serialize_pem())?;
        Ok(DevCa {
            ca_pem: certified.pem(),
            ca_der: certified.der().clone(),
            issuer: Issuer::new(params, key),
            validity,
        })
    }

    /// The CA that [`write_ca`] wrote to `dir` (`ca.pem`, `ca.key`); `None` when
    /// either file is missing. Leaves it issues are valid from a day ago to the
    /// CA's own end.
    pub fn load(dir: &Path) -> Result<Option<DevCa>, CertError> {
        let (cert_path, key_path) = (dir.join("ca.pem"), dir.join("ca.key"));
        if !cert_path.is_file() || !key_path.is_file() {
            return Ok(None);
        }
        let bad = |problem: String| CertError::BadCa {
            dir: dir.to_path_buf(),
            problem,
        };
        let read =
            |p: &Path| std::fs::read_to_string(p).map_err(|e| bad(format!("{}: {e}", p.display())));
        let ca_pem = read(&cert_path)?;
        let key = KeyPair::from_pem(&read(&key_path)?)?;
        let ca_der = tls::parse_certs_pem(&ca_pem, "ca.pem")?
            .into_iter()
            .next()
            .ok_or_else(|| bad("ca.pem holds no certificate".into()))?;
        let (_, x509) = x509_parser::parse_x509_certificate(ca_der.as_ref())
            .map_err(|e| bad(format!("ca.pem: {e}")))?;
        let name = x509
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .ok_or_else(|| bad("ca.pem has no common name".into()))?
            .to_owned();
        let mut validity = params_valid_from_now();
        validity.not_after = x509.validity().not_after.to_datetime();
        let mut params = CertificateParams::default();
        params.distinguished_name = common_name(&name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        Ok(Some(DevCa {
            issuer: Issuer::new(params, key),
            ca_pem,
            ca_der,
            validity,
        }))
    }

    /// The CA certificate, PEM (what peers put in their trust store).
    pub fn ca_pem(&self) -> String {
        self.ca_pem.clone()
    }

    /// The CA certificate, DER.
    pub fn ca_der(&self) -> CertificateDer<'static> {
        self.ca_der.clone()
    }

    /// A server certificate with the given DNS names and IP literals as SANs (for example
    /// `["localhost", "127.0.0.1", "switchyard"]`); CN is the first name. EKU serverAuth.
    pub fn issue_server(&self, names: &[&str]) -> Result<Issued, CertError> {
        let first = names.first().ok_or(CertError::NoServerNames)?;
        let mut params = self.validity.clone();
        params.distinguished_name = common_name(first);
        params.subject_alt_names = names
            .iter()
            .map(|name| match name.parse() {
                Ok(ip) => Ok(SanType::IpAddress(ip)),
                Err(_) => Ok(SanType::DnsName((*name).try_into()?)),
            })
            .collect::<Result<_, rcgen::Error>>()?;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.issue(params)
    }

    /// A client certificate for an institution: subject CN = `common_name`, a URI SAN
    /// `urn:switchyard:institution:<common_name>`, and a DNS SAN of the same value when it is
    /// a valid DNS name (all-numeric ids such as "100001" are not, so they get none).
    /// EKU clientAuth.
    pub fn issue_client(&self, common_name: &str) -> Result<Issued, CertError> {
        let urn_safe = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_' | ':');
        if common_name.is_empty() || !common_name.chars().all(urn_safe) {
            return Err(CertError::InvalidCommonName {
                name: common_name.to_owned(),
            });
        }
        let mut params = self.validity.clone();
        params.distinguished_name = self::common_name(common_name);
        if DnsName::try_from(common_name).is_ok() {
            params
                .subject_alt_names
                .push(SanType::DnsName(common_name.try_into()?));
        }
        let urn = format!("{INSTITUTION_URN_PREFIX}{common_name}");
        params.subject_alt_names.push(SanType::URI(urn.try_into()?));
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.issue(params)
    }

    /// Signs a leaf: fresh P-256 key, digital-signature key usage, authority key identifier.
    fn issue(&self, mut params: CertificateParams) -> Result<Issued, CertError> {
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.use_authority_key_identifier_extension = true;
        // A random serial (from the standard library's randomly keyed hasher), kept
        // so that the certificate can be revoked.
        use std::hash::BuildHasher;
        let random = |n: u64| std::collections::hash_map::RandomState::new().hash_one(n);
        let mut serial = [random(1).to_be_bytes(), random(2).to_be_bytes()].concat();
        serial[0] &= 0x7f; // positive
        serial[0] |= 0x01; // no leading zero byte
        params.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            serial,
        })
    }

    /// A certificate revocation list, PEM, signed by this CA, naming `revoked`; valid
    /// from a day ago for thirty days.
    pub fn revocation_list(&self, revoked: &[&Issued]) -> Result<String, CertError> {
        let now = Duration::from_millis(switchyard::clock::unix_ms());
        let epoch = rcgen::date_time_ymd(1970, 1, 1);
        let this_update = epoch + now.saturating_sub(Duration::from_secs(VALIDITY_BACKDATE_S));
        let params = rcgen::CertificateRevocationListParams {
            this_update,
            next_update: epoch + now + Duration::from_secs(30 * 86_400),
            crl_number: rcgen::SerialNumber::from(1u64),
            issuing_distribution_point: None,
            revoked_certs: revoked
                .iter()
                .map(|i| rcgen::RevokedCertParams {
                    serial_number: rcgen::SerialNumber::from_slice(&i.serial),
                    revocation_time: this_update,
                    reason_code: Some(rcgen::RevocationReason::KeyCompromise),
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: rcgen::KeyIdMethod::Sha256,
        };
        Ok(params.signed_by(&self.issuer)?.pem()?)
    }
}

fn write_file(path: &Path, contents: &str, private: bool) -> Result<(), CertError> {
    use std::io::Write;
    let io_error = |source| CertError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if private {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path).map_err(io_error)?;
    // `mode` only applies when the file is created; tighten an existing file too.
    #[cfg(unix)]
    if private {
        use std::os::unix::fs::PermissionsExt;
        file.set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(io_error)?;
    }
    #[cfg(not(unix))]
    let _ = private;
    file.write_all(contents.as_bytes()).map_err(io_error)?;
    file.sync_all().map_err(io_error)
}

fn create_dir(dir: &Path) -> Result<(), CertError> {
    std::fs::create_dir_all(dir).map_err(|source| CertError::Io {
        path: dir.to_path_buf(),
        source,
    })
}

/// Writes `<dir>/<stem>.pem` and `<dir>/<stem>.key` (the key with mode 0600 on unix),
/// creating `dir` if needed.
pub fn write_issued(dir: &Path, stem: &str, issued: &Issued) -> Result<(), CertError> {
    create_dir(dir)?;
    write_file(&dir.join(format!("{stem}.pem")), &issued.cert_pem, false)?;
    write_file(&dir.join(format!("{stem}.key")), &issued.key_pem, true)
}

/// Writes `<dir>/ca.pem` and its key `<dir>/ca.key` (mode 0600 on unix), creating `dir` if
/// needed, so that [`DevCa::load`] can issue more certificates later (an institution added
/// by a reload).
pub fn write_ca(dir: &Path, ca: &DevCa) -> Result<(), CertError> {
    create_dir(dir)?;
    write_file(&dir.join("ca.pem"), &ca.ca_pem(), false)?;
    write_file(&dir.join("ca.key"), &ca.issuer.key().serialize_pem(), true)
}

/// `switchyard gen-certs`: a development CA in `out` (or the one already there,
/// extended) and a certificate for the switch, its client side, every institution
/// and every bank of the config at `config`. Returns what it wrote.
pub fn gen_certs(out: &Path, config: &Path) -> anyhow::Result<String> {
    let c = switchyard::config::Config::load(config)?;
    // An existing CA in `out` is extended: only certificates not there yet are
    // issued (an institution or bank added to the config, for a reload).
    let (ca, extended) = match DevCa::load(out)? {
        Some(ca) => (ca, true),
        None => {
            let ca = DevCa::new("switchyard development CA")?;
            write_ca(out, &ca)?;
            (ca, false)
        }
    };
    let mut written = Vec::new();
    let mut issue = |stem: &str, make: &dyn Fn() -> Result<Issued, CertError>| {
        if extended && out.join(format!("{stem}.pem")).is_file() {
            return Ok::<_, anyhow::Error>(());
        }
        write_issued(out, stem, &make()?)?;
        written.push(stem.to_owned());
        Ok(())
    };
    issue("switch", &|| {
        ca.issue_server(&["localhost", "127.0.0.1", "switchyard"])
    })?;
    issue("switch-client", &|| ca.issue_client("switchyard"))?;
    for inst in &c.institutions {
        issue(&inst.certificate_name, &|| {
            ca.issue_client(&inst.certificate_name)
        })?;
    }
    for bank in &c.banks {
        let stem = format!("bank-{}", bank.id);
        issue(&stem, &|| ca.issue_server(&[&bank.server_name]))?;
    }
    let what = if extended {
        "extended the CA in"
    } else {
        "wrote a new CA (ca.pem, ca.key) in"
    };
    Ok(format!(
        "{what} {}: {}",
        out.display(),
        if written.is_empty() {
            "no new certificates needed".to_owned()
        } else {
            format!("issued {}", written.join(", "))
        }
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::{handshake, TempDir};
    use switchyard::tls::{
        client_config, load_certs, load_key, peer_identity, server_config, IdentitySource,
    };

    #[test]
    fn client_certificate_names() {
        let ca = DevCa::new("dev ca").unwrap();
        let numeric = ca.issue_client("100001").unwrap().chain().unwrap();
        assert_eq!(
            peer_identity(&numeric[0], IdentitySource::UriSan).as_deref(),
            Ok("urn:switchyard:institution:100001")
        );
        assert!(peer_identity(&numeric[0], IdentitySource::DnsSan).is_err());

        let dns = ca.issue_client("bank-a").unwrap().chain().unwrap();
        assert_eq!(
            peer_identity(&dns[0], IdentitySource::DnsSan).as_deref(),
            Ok("bank-a")
        );
        assert_eq!(
            peer_identity(&dns[0], IdentitySource::CommonName).as_deref(),
            Ok("bank-a")
        );
    }

    #[test]
    fn invalid_names_are_refused() {
        let ca = DevCa::new("dev ca").unwrap();
        assert!(matches!(
            ca.issue_server(&[]),
            Err(CertError::NoServerNames)
        ));
        assert!(matches!(
            ca.issue_client(""),
            Err(CertError::InvalidCommonName { .. })
        ));
        assert!(matches!(
            ca.issue_client("a b"),
            Err(CertError::InvalidCommonName { .. })
        ));
    }

    #[test]
    fn debug_never_shows_the_key() {
        let ca = DevCa::new("dev ca").unwrap();
        let issued = ca.issue_client("100001").unwrap();
        assert!(!format!("{issued:?}").contains("PRIVATE KEY"));
        assert!(!format!("{ca:?}").contains("PRIVATE KEY"));
    }

    /// Files written by `write_issued`/`write_ca`, loaded back with `tls::load_*`, give a
    /// working mutual-TLS pair.
    #[tokio::test]
    async fn written_files_load_and_handshake() {
        let dir = TempDir::new("roundtrip");
        let ca = DevCa::new("dev ca").unwrap();
        write_ca(&dir.0, &ca).unwrap();
        write_issued(
            &dir.0,
            "server",
            &ca.issue_server(&["localhost", "127.0.0.1"]).unwrap(),
        )
        .unwrap();
        write_issued(&dir.0, "100001", &ca.issue_client("100001").unwrap()).unwrap();

        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.0.join("100001.key"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }

        let ca_certs = load_certs(&dir.0.join("ca.pem")).unwrap();
        let server = server_config(
            &ca_certs,
            load_certs(&dir.0.join("server.pem")).unwrap(),
            load_key(&dir.0.join("server.key")).unwrap(),
        )
        .unwrap();
        let client = client_config(
            &ca_certs,
            load_certs(&dir.0.join("100001.pem")).unwrap(),
            load_key(&dir.0.join("100001.key")).unwrap(),
        )
        .unwrap();
        let outcome = handshake(server.clone(), client, &[IdentitySource::CommonName]).await;
        let ids = outcome.server.expect("server handshake");
        assert_eq!(ids[0].as_deref(), Ok("100001"));
        assert!(outcome.client_got_greeting);

        // The CA read back from the files issues certificates the same peers trust,
        // and a CRL of it is accepted (a certificate it revokes is refused).
        let loaded = DevCa::load(&dir.0)
            .unwrap()
            .expect("ca.pem and ca.key written");
        assert_eq!(loaded.ca_pem(), ca.ca_pem());
        let later = loaded.issue_client("100009").unwrap();
        let client =
            client_config(&ca_certs, later.chain().unwrap(), later.key().unwrap()).unwrap();
        let outcome = handshake(server, client.clone(), &[IdentitySource::CommonName]).await;
        assert_eq!(
            outcome.server.expect("server handshake")[0].as_deref(),
            Ok("100009")
        );
        let crl = dir.0.join("ca.crl.pem");
        std::fs::write(&crl, loaded.revocation_list(&[&later]).unwrap()).unwrap();
        let revoking = switchyard::tls::server_config_with_crls(
            &ca_certs,
            load_certs(&dir.0.join("server.pem")).unwrap(),
            load_key(&dir.0.join("server.key")).unwrap(),
            switchyard::tls::load_crls(&crl).unwrap(),
        )
        .unwrap();
        let outcome = handshake(revoking, client, &[IdentitySource::CommonName]).await;
        assert!(outcome.server.is_err(), "revoked by the loaded CA's list");
        assert!(DevCa::load(&dir.0.join("nothing")).unwrap().is_none());
    }

    #[test]
    fn rewriting_an_existing_key_tightens_its_mode() {
        let dir = TempDir::new("mode");
        let ca = DevCa::new("dev ca").unwrap();
        let issued = ca.issue_client("100002").unwrap();
        std::fs::create_dir_all(&dir.0).unwrap();
        std::fs::write(dir.0.join("100002.key"), "old").unwrap();
        write_issued(&dir.0, "100002", &issued).unwrap();
        let written = std::fs::read_to_string(dir.0.join("100002.key")).unwrap();
        assert_eq!(written, issued.key_pem);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.0.join("100002.key"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }
}
