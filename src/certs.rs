//! `strait certs`: the cluster CA and the certificates of its identities.
//! `init` creates a CA whose certificate names the trust domain
//! (`spiffe://<trust-domain>` URI SAN); `issue` signs a fresh key for
//! `spiffe://<trust-domain>/<control|node|admin>/<name>`. Keys are written
//! 0600, every file atomically (a process reloading it never sees half).

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use clap::{Subcommand, ValueEnum};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use strait_proto::tls::{Identity, Role};

#[derive(Subcommand, Debug)]
pub enum CertsCommand {
    /// Create a cluster CA: DIR/ca.crt and DIR/ca.key (0600).
    Init {
        /// The cluster's SPIFFE trust domain, e.g. prod.example.
        #[arg(long)]
        trust_domain: String,
        /// Directory to write ca.crt and ca.key to.
        #[arg(long)]
        out: PathBuf,
        /// How long the CA is valid, e.g. 87600h.
        #[arg(long, default_value = "87600h", value_parser = humantime::parse_duration)]
        lifetime: Duration,
    },
    /// Issue a key and certificate for an identity: OUT/<role>-<name>.crt and .key (0600).
    Issue {
        /// control (a replica; NAME is its id), node (NAME is its --name) or admin.
        role: RoleArg,
        /// The replica id, node name or admin name.
        name: String,
        /// Directory to write the files to.
        #[arg(long, default_value = ".")]
        out: PathBuf,
        /// Directory holding ca.crt and ca.key (default: --out).
        #[arg(long)]
        ca_dir: Option<PathBuf>,
        /// How long the certificate is valid, e.g. 8760h.
        #[arg(long, default_value = "8760h", value_parser = humantime::parse_duration)]
        lifetime: Duration,
    },
}

#[derive(ValueEnum, Debug, Clone, Copy)]
pub enum RoleArg {
    Control,
    Node,
    Admin,
}

impl From<RoleArg> for Role {
    fn from(r: RoleArg) -> Role {
        match r {
            RoleArg::Control => Role::Control,
            RoleArg::Node => Role::Node,
            RoleArg::Admin => Role::Admin,
        }
    }
}

/// Errors creating the CA or issuing a certificate.
#[derive(Debug, thiserror::Error)]
pub enum CertsError {
    /// A file cannot be read or written.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// `init` would overwrite a CA.
    #[error("{0} exists: a new CA is a rotation, create it in another directory")]
    Exists(PathBuf),
    /// Certificate generation failed.
    #[error("{context}: {source}")]
    Rcgen {
        context: &'static str,
        #[source]
        source: rcgen::Error,
    },
    /// The trust domain, name or CA certificate is not usable.
    #[error(transparent)]
    Identity(#[from] strait_proto::tls::TlsError),
    /// The CA certificate does not name a trust domain.
    #[error(
        "{0}: the CA certificate carries no spiffe://<trust-domain> URI SAN (was it made by `strait certs init`?)"
    )]
    NoTrustDomain(PathBuf),
    /// A lifetime too long to represent.
    #[error("lifetime {0:?} is too long")]
    Lifetime(Duration),
}

fn rcgen_err(context: &'static str) -> impl FnOnce(rcgen::Error) -> CertsError {
    move |source| CertsError::Rcgen { context, source }
}

pub fn run(cmd: CertsCommand) -> anyhow::Result<()> {
    match cmd {
        CertsCommand::Init {
            trust_domain,
            out,
            lifetime,
        } => init(&trust_domain, &out, lifetime)?,
        CertsCommand::Issue {
            role,
            name,
            out,
            ca_dir,
            lifetime,
        } => issue(
            role.into(),
            &name,
            &out,
            ca_dir.as_deref().unwrap_or(&out),
            lifetime,
        )?,
    }
    Ok(())
}

/// Valid from a minute ago (clocks differ a little) for `lifetime`.
fn validity(params: &mut CertificateParams, lifetime: Duration) -> Result<SystemTime, CertsError> {
    let now = SystemTime::now();
    let not_after = now
        .checked_add(lifetime)
        .ok_or(CertsError::Lifetime(lifetime))?;
    params.not_before = (now - Duration::from_secs(60)).into();
    params.not_after = not_after.into();
    Ok(not_after)
}

fn uri_san(uri: String) -> Result<SanType, CertsError> {
    Ok(SanType::URI(
        uri.try_into().map_err(rcgen_err("identity URI"))?,
    ))
}

/// Creates `out/ca.crt` and `out/ca.key`.
pub fn init(trust_domain: &str, out: &Path, lifetime: Duration) -> Result<(), CertsError> {
    strait_proto::tls::check_trust_domain(trust_domain)?;
    let (crt, key) = (out.join("ca.crt"), out.join("ca.key"));
    for p in [&crt, &key] {
        if p.exists() {
            return Err(CertsError::Exists(p.clone()));
        }
    }
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, format!("Strait CA {trust_domain}"));
    params
        .distinguished_name
        .push(DnType::OrganizationName, "strait");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.subject_alt_names = vec![uri_san(format!("spiffe://{trust_domain}"))?];
    let not_after = validity(&mut params, lifetime)?;
    let key_pair = KeyPair::generate().map_err(rcgen_err("generating the CA key"))?;
    let cert = params
        .self_signed(&key_pair)
        .map_err(rcgen_err("signing the CA certificate"))?;
    create_dir(out)?;
    write_atomic(&key, key_pair.serialize_pem().as_bytes(), 0o600)?;
    write_atomic(&crt, cert.pem().as_bytes(), 0o644)?;
    println!(
        "created CA spiffe://{trust_domain}, valid until {}: {} {}",
        humantime::format_rfc3339_seconds(not_after),
        crt.display(),
        key.display()
    );
    Ok(())
}

fn trust_domain_of(ca_pem: &[u8], path: &Path) -> Result<String, CertsError> {
    use rustls::pki_types::pem::PemObject;
    let der = rustls::pki_types::CertificateDer::from_pem_slice(ca_pem)
        .map_err(|_| CertsError::NoTrustDomain(path.to_path_buf()))?;
    strait_proto::tls::spiffe_uris(&der)?
        .iter()
        .filter_map(|u| u.strip_prefix("spiffe://"))
        .find(|td| !td.is_empty() && !td.contains('/'))
        .map(str::to_string)
        .ok_or_else(|| CertsError::NoTrustDomain(path.to_path_buf()))
}

/// Issues `out/<role>-<name>.crt` and `.key`, signed by the CA in `ca_dir`.
pub fn issue(
    role: Role,
    name: &str,
    out: &Path,
    ca_dir: &Path,
    lifetime: Duration,
) -> Result<(), CertsError> {
    let (ca_crt, ca_key) = (ca_dir.join("ca.crt"), ca_dir.join("ca.key"));
    let ca_pem = read(&ca_crt)?;
    let trust_domain = trust_domain_of(&ca_pem, &ca_crt)?;
    let identity = Identity::new(&trust_domain, role, name)?;
    let ca_key_pem = String::from_utf8_lossy(&read(&ca_key)?).into_owned();
    let ca_key_pair = KeyPair::from_pem(&ca_key_pem).map_err(rcgen_err("reading the CA key"))?;
    let issuer = Issuer::from_ca_cert_pem(&String::from_utf8_lossy(&ca_pem), ca_key_pair)
        .map_err(rcgen_err("reading the CA certificate"))?;

    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, format!("{role}/{name}"));
    params
        .distinguished_name
        .push(DnType::OrganizationName, "strait");
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = match role {
        // A replica serves clients and dials its peers.
        Role::Control => vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ],
        Role::Node | Role::Admin => vec![ExtendedKeyUsagePurpose::ClientAuth],
    };
    params.use_authority_key_identifier_extension = true;
    params.subject_alt_names = vec![uri_san(identity.to_string())?];
    let not_after = validity(&mut params, lifetime)?;
    let key_pair = KeyPair::generate().map_err(rcgen_err("generating the key"))?;
    let cert = params
        .signed_by(&key_pair, &issuer)
        .map_err(rcgen_err("signing the certificate"))?;
    create_dir(out)?;
    let base = format!("{role}-{name}");
    let (crt, key) = (
        out.join(format!("{base}.crt")),
        out.join(format!("{base}.key")),
    );
    write_atomic(&key, key_pair.serialize_pem().as_bytes(), 0o600)?;
    write_atomic(&crt, cert.pem().as_bytes(), 0o644)?;
    println!(
        "issued {identity}, valid until {}: {} {}",
        humantime::format_rfc3339_seconds(not_after),
        crt.display(),
        key.display()
    );
    Ok(())
}

fn read(path: &Path) -> Result<Vec<u8>, CertsError> {
    std::fs::read(path).map_err(|source| CertsError::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn create_dir(dir: &Path) -> Result<(), CertsError> {
    std::fs::create_dir_all(dir).map_err(|source| CertsError::Io {
        path: dir.to_path_buf(),
        source,
    })
}

/// Writes through a temporary file renamed over `path`, created with `mode`.
fn write_atomic(path: &Path, data: &[u8], mode: u32) -> Result<(), CertsError> {
    let io = |source| CertsError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{file_name}.tmp"));
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io)?;
    // The umask may have narrowed the mode; a key must be exactly 0600.
    f.set_permissions(std::fs::Permissions::from_mode(mode))
        .map_err(io)?;
    f.write_all(data).map_err(io)?;
    f.sync_all().map_err(io)?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(io)
}
