//! Whom the client trusts and who it is: the CA that signed etcd's server certificates, the
//! client certificate it presents, and the etcd user it authenticates as.

use super::{EtcdError, Result};

/// The TLS and authentication settings of a [`super::Client`]. The default trusts the system's
/// roots (for `https://`), presents no certificate and sends no credentials.
#[derive(Clone, Default)]
pub struct Access {
    /// PEM certificates: the only roots trusted for etcd's server certificate.
    pub ca_pem: Option<Vec<u8>>,
    /// PEM: the client certificate (and any intermediates) followed by its private key.
    pub identity_pem: Option<Vec<u8>>,
    /// The etcd user and password.
    pub credentials: Option<Credentials>,
}

impl std::fmt::Debug for Access {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Access")
            .field("ca", &self.ca_pem.is_some())
            .field("client_certificate", &self.identity_pem.is_some())
            .field("credentials", &self.credentials)
            .finish()
    }
}

/// An etcd user and its password (never shown by `Debug`).
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub user: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("user", &self.user)
            .field("password", &"(hidden)")
            .finish()
    }
}

impl Access {
    /// Sets the HTTP client's roots and identity. A CA replaces the built-in roots entirely:
    /// a server certificate signed by anyone else is refused, and the name in the endpoint
    /// must match the certificate's.
    pub(super) fn apply(
        &self,
        mut builder: reqwest::ClientBuilder,
    ) -> Result<reqwest::ClientBuilder> {
        if let Some(pem) = &self.ca_pem {
            let certs = reqwest::Certificate::from_pem_bundle(pem).map_err(|e| EtcdError::Tls {
                what: "the CA bundle",
                why: e.to_string(),
            })?;
            if certs.is_empty() {
                return Err(EtcdError::Tls {
                    what: "the CA bundle",
                    why: "it holds no PEM certificate".into(),
                });
            }
            builder = builder.tls_built_in_root_certs(false);
            for c in certs {
                builder = builder.add_root_certificate(c);
            }
        }
        if let Some(pem) = &self.identity_pem {
            let id = reqwest::Identity::from_pem(pem).map_err(|e| EtcdError::Tls {
                what: "the client certificate and key",
                why: e.to_string(),
            })?;
            builder = builder.identity(id);
        }
        Ok(builder)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_hides_the_password_and_bad_pem_is_named() {
        let a = Access {
            credentials: Some(Credentials {
                user: "u".into(),
                password: "s3cret".into(),
            }),
            ..Access::default()
        };
        assert!(!format!("{a:?}").contains("s3cret"));
        let bad = Access {
            ca_pem: Some(b"not a certificate".to_vec()),
            ..Access::default()
        };
        let e = bad.apply(reqwest::Client::builder()).unwrap_err();
        assert!(e.to_string().contains("CA bundle"), "{e}");
        let bad = Access {
            identity_pem: Some(
                b"-----BEGIN PRIVATE KEY-----\nxx\n-----END PRIVATE KEY-----\n".to_vec(),
            ),
            ..Access::default()
        };
        let e = bad.apply(reqwest::Client::builder()).unwrap_err();
        assert!(e.to_string().contains("client certificate"), "{e}");
    }
}
