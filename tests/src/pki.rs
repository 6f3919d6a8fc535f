//! Throwaway certificate authorities for the TLS tests (rcgen), written as PEM files into
//! a directory per test; and the Python of the test venv, whose confluent-kafka speaks TLS.

use std::{
    net::IpAddr,
    path::PathBuf,
    sync::atomic::{AtomicUsize, Ordering},
};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, SanType};

/// The Python of the test venv (`cargo xtask setup` installs confluent-kafka there).
pub fn python() -> PathBuf {
    std::env::var_os("KPSC_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/venv/bin/python")
        })
}

/// A directory with two CAs, `ca.pem` (the one trusted) and `other-ca.pem`, and what
/// they issue.
pub struct Pki {
    dir: PathBuf,
    ca: Issuer<'static, KeyPair>,
    other_ca: Issuer<'static, KeyPair>,
}

fn new_ca(name: &str) -> (Issuer<'static, KeyPair>, String) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    // Distinct names: a leaf whose subject equals its issuer's is taken as self-signed.
    params.distinguished_name.push(DnType::CommonName, name);
    let pem = params.self_signed(&key).unwrap().pem();
    (Issuer::new(params, key), pem)
}

impl Pki {
    /// The CAs, and from `ca.pem` a server certificate `server` and another `other`, both
    /// for `kafka.example` and the advertised addresses 127.0.1.1-3.
    pub fn new() -> Self {
        // One directory per test: tests run in parallel and each removes its own.
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "kpsc-tls-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let (ca, ca_pem) = new_ca("kpsc test CA");
        let (other_ca, other_pem) = new_ca("kpsc other CA");
        std::fs::write(dir.join("ca.pem"), ca_pem).unwrap();
        std::fs::write(dir.join("other-ca.pem"), other_pem).unwrap();
        let pki = Self { dir, ca, other_ca };
        let advertised: Vec<IpAddr> = (1..=3u8).map(|i| [127, 0, 1, i].into()).collect();
        pki.server("server", &advertised);
        pki.server("other", &advertised);
        pki
    }

    /// `NAME.pem` and `NAME.key`: a server certificate from `ca.pem` for `kafka.example`
    /// and `ips`.
    pub fn server(&self, name: &str, ips: &[IpAddr]) {
        let mut params = CertificateParams::new(vec!["kafka.example".to_owned()]).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, format!("kpsc test {name}"));
        for ip in ips {
            params.subject_alt_names.push(SanType::IpAddress(*ip));
        }
        self.write(name, params, &self.ca);
    }

    /// `NAME.pem` and `NAME.key`: a client certificate with common name `cn`, from
    /// `ca.pem`, or from `other-ca.pem` when `trusted` is false.
    pub fn client(&self, name: &str, cn: &str, trusted: bool) {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        params
            .distinguished_name
            .push(DnType::OrganizationName, "kpsc tests");
        let issuer = if trusted { &self.ca } else { &self.other_ca };
        self.write(name, params, issuer);
    }

    fn write(&self, name: &str, params: CertificateParams, issuer: &Issuer<'_, KeyPair>) {
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, issuer).unwrap();
        std::fs::write(self.dir.join(format!("{name}.pem")), cert.pem()).unwrap();
        std::fs::write(self.dir.join(format!("{name}.key")), key.serialize_pem()).unwrap();
    }

    pub fn path(&self, name: &str) -> String {
        self.dir.join(name).to_string_lossy().into_owned()
    }
}

impl Default for Pki {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        if std::env::var_os("KPSC_KEEP_PKI").is_some() {
            eprintln!("PKI kept in {}", self.dir.display());
            return;
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
