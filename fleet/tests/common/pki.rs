//! Certificates for tests: a CA, etcd's server certificate, client certificates (current,
//! expired, or from another CA), written as PEM files.

use rcgen::{
    date_time_ymd, BasicConstraints, CertificateParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, SanType,
};
use std::path::{Path, PathBuf};

/// A CA that signs certificates into `dir`.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pub cert: PathBuf,
}

/// A certificate and its key, as files.
pub struct Pair {
    pub cert: PathBuf,
    pub key: PathBuf,
}

fn write(path: &Path, text: &str, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

impl Ca {
    pub fn new(dir: &Path, name: &str) -> Ca {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name = DistinguishedName::new();
        p.distinguished_name.push(DnType::CommonName, name);
        let key = KeyPair::generate().unwrap();
        let cert = p.self_signed(&key).unwrap();
        let path = dir.join(format!("{name}.crt"));
        write(&path, &cert.pem(), 0o644);
        Ca {
            issuer: Issuer::new(p, key),
            cert: path,
        }
    }

    fn sign(&self, dir: &Path, name: &str, mut p: CertificateParams) -> Pair {
        let key = KeyPair::generate().unwrap();
        if p.distinguished_name.iter().next().is_none() {
            // etcd's gateway refuses client certificates with a common name once
            // authentication is on: identify by organisation only.
            p.distinguished_name
                .push(DnType::OrganizationName, "caisson-test");
        }
        let cert = p.signed_by(&key, &self.issuer).unwrap();
        let pair = Pair {
            cert: dir.join(format!("{name}.crt")),
            key: dir.join(format!("{name}.key")),
        };
        write(&pair.cert, &cert.pem(), 0o644);
        write(&pair.key, &key.serialize_pem(), 0o600);
        pair
    }

    /// etcd's server certificate for `ips` (and no DNS name).
    pub fn server(&self, dir: &Path, ips: &[&str]) -> Pair {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.subject_alt_names = ips
            .iter()
            .map(|ip| SanType::IpAddress(ip.parse().unwrap()))
            .collect();
        p.distinguished_name = DistinguishedName::new();
        p.distinguished_name.push(DnType::CommonName, "etcd-server");
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        self.sign(dir, "server", p)
    }

    /// A client certificate without a common name; `expired` makes one that ended in 2020.
    pub fn client(&self, dir: &Path, name: &str, expired: bool) -> Pair {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name = DistinguishedName::new();
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        if expired {
            p.not_before = date_time_ymd(2020, 1, 1);
            p.not_after = date_time_ymd(2020, 1, 2);
        }
        self.sign(dir, name, p)
    }
}
