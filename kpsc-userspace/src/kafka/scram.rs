//! The client side of SCRAM (RFC 5802) with SHA-256/SHA-512 (RFC 7677), as Kafka uses it:
//! no channel binding (`n,,`), no authorization id. Only the message flow is here; the
//! primitives (PBKDF2, HMAC, digests) are ring's, the nonce comes from ring's system RNG.
//!
//! The server signature is verified: a broker that does not hold this user's credentials
//! (or something impersonating it) cannot complete the exchange.

use std::num::NonZeroU32;

use base64::{Engine as _, engine::general_purpose::STANDARD as B64};
use ring::{digest, hmac, pbkdf2, rand::SecureRandom as _};

/// The most PBKDF2 iterations kpscd runs for one exchange: Kafka brokers allow 4096 to
/// 16384; a hostile broker must not make each connection burn seconds of CPU.
pub const MAX_ITERATIONS: u32 = 65_536;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScramHash {
    Sha256,
    Sha512,
}

impl ScramHash {
    fn pbkdf2(self) -> pbkdf2::Algorithm {
        match self {
            Self::Sha256 => pbkdf2::PBKDF2_HMAC_SHA256,
            Self::Sha512 => pbkdf2::PBKDF2_HMAC_SHA512,
        }
    }
    fn hmac(self) -> hmac::Algorithm {
        match self {
            Self::Sha256 => hmac::HMAC_SHA256,
            Self::Sha512 => hmac::HMAC_SHA512,
        }
    }
    fn digest(self) -> &'static digest::Algorithm {
        match self {
            Self::Sha256 => &digest::SHA256,
            Self::Sha512 => &digest::SHA512,
        }
    }
    fn len(self) -> usize {
        self.digest().output_len()
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ScramError {
    /// The server said no (`e=...` in its final message).
    #[error("{0}")]
    Rejected(String),
    /// The server's messages do not follow RFC 5802, or its signature is wrong.
    #[error("{0}")]
    Protocol(String),
}

fn protocol(reason: impl Into<String>) -> ScramError {
    ScramError::Protocol(reason.into())
}

/// A SCRAM exchange after the client's first message.
pub struct ScramClient {
    hash: ScramHash,
    nonce: String,
    client_first_bare: String,
}

/// What checks the server's final message.
pub struct ServerCheck {
    server_key: hmac::Key,
    auth_message: String,
}

/// A fresh client nonce: 24 random bytes, base64 (printable, never a comma).
pub fn new_nonce() -> Result<String, ScramError> {
    let mut bytes = [0u8; 24];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| protocol("the system random number generator failed"))?;
    Ok(B64.encode(bytes))
}

impl ScramClient {
    pub fn new(hash: ScramHash, username: &str, nonce: String) -> Self {
        // saslname: `=` and `,` are escaped (RFC 5802 5.1).
        let name = username.replace('=', "=3D").replace(',', "=2C");
        Self {
            hash,
            client_first_bare: format!("n={name},r={nonce}"),
            nonce,
        }
    }

    /// The client-first-message: GS2 header `n,,` (no channel binding, no authzid).
    pub fn client_first(&self) -> String {
        format!("n,,{}", self.client_first_bare)
    }

    /// Answers the server-first-message with the client-final-message (carrying the
    /// proof), and returns what verifies the server-final-message.
    pub fn client_final(
        &self,
        server_first: &[u8],
        password: &str,
    ) -> Result<(String, ServerCheck), ScramError> {
        let server_first = std::str::from_utf8(server_first)
            .map_err(|_| protocol("server-first-message is not UTF-8"))?;
        let mut nonce = None;
        let mut salt = None;
        let mut iterations = None;
        for (i, attribute) in server_first.split(',').enumerate() {
            match attribute.split_at_checked(2) {
                Some(("m=", _)) if i == 0 => {
                    return Err(protocol(
                        "server-first-message asks for a mandatory extension kpscd does not know",
                    ));
                }
                Some(("r=", value)) if i == 0 => nonce = Some(value),
                Some(("s=", value)) if i == 1 => salt = Some(value),
                Some(("i=", value)) if i == 2 => iterations = Some(value),
                // Extensions after i= are optional (RFC 5802 7).
                _ if i > 2 => {}
                _ => {
                    return Err(protocol(format!(
                        "server-first-message {server_first:?} is not r=...,s=...,i=..."
                    )));
                }
            }
        }
        let (Some(nonce), Some(salt), Some(iterations)) = (nonce, salt, iterations) else {
            return Err(protocol(format!(
                "server-first-message {server_first:?} lacks its nonce, salt or iteration count"
            )));
        };
        if !nonce.starts_with(&self.nonce) || nonce.len() == self.nonce.len() {
            return Err(protocol(
                "the server's nonce does not extend kpscd's (a replayed or foreign exchange)",
            ));
        }
        let salt = B64
            .decode(salt)
            .map_err(|e| protocol(format!("the server's salt is not base64: {e}")))?;
        let iterations = iterations
            .parse::<u32>()
            .ok()
            .and_then(NonZeroU32::new)
            .filter(|n| n.get() <= MAX_ITERATIONS)
            .ok_or_else(|| {
                protocol(format!(
                    "iteration count {iterations:?} is not between 1 and {MAX_ITERATIONS}"
                ))
            })?;

        let hash = self.hash;
        let mut salted = vec![0u8; hash.len()];
        pbkdf2::derive(
            hash.pbkdf2(),
            iterations,
            &salt,
            password.as_bytes(),
            &mut salted,
        );
        let salted = hmac::Key::new(hash.hmac(), &salted);
        let client_key = hmac::sign(&salted, b"Client Key");
        let stored_key = digest::digest(hash.digest(), client_key.as_ref());
        // c=biws: base64 of the GS2 header `n,,`.
        let without_proof = format!("c=biws,r={nonce}");
        let auth_message = format!("{},{server_first},{without_proof}", self.client_first_bare);
        let client_signature = hmac::sign(
            &hmac::Key::new(hash.hmac(), stored_key.as_ref()),
            auth_message.as_bytes(),
        );
        let proof: Vec<u8> = client_key
            .as_ref()
            .iter()
            .zip(client_signature.as_ref())
            .map(|(k, s)| k ^ s)
            .collect();
        let server_key = hmac::sign(&salted, b"Server Key");
        Ok((
            format!("{without_proof},p={}", B64.encode(proof)),
            ServerCheck {
                server_key: hmac::Key::new(hash.hmac(), server_key.as_ref()),
                auth_message,
            },
        ))
    }
}

impl ServerCheck {
    /// Accepts the server-final-message only with the right signature.
    pub fn verify(&self, server_final: &[u8]) -> Result<(), ScramError> {
        let server_final = std::str::from_utf8(server_final)
            .map_err(|_| protocol("server-final-message is not UTF-8"))?;
        let first = server_final.split(',').next().unwrap_or_default();
        if let Some(error) = first.strip_prefix("e=") {
            return Err(ScramError::Rejected(error.to_owned()));
        }
        let signature = first
            .strip_prefix("v=")
            .ok_or_else(|| protocol(format!("server-final-message {server_final:?} has no v=")))
            .and_then(|v| {
                B64.decode(v)
                    .map_err(|e| protocol(format!("the server signature is not base64: {e}")))
            })?;
        // Constant-time comparison inside ring.
        hmac::verify(&self.server_key, self.auth_message.as_bytes(), &signature).map_err(|_| {
            protocol(
                "the broker's SCRAM server signature is wrong: it does not hold this user's \
                 credentials (is it the broker it claims to be?)",
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 7677 section 3's SCRAM-SHA-256 example, byte for byte.
    #[test]
    fn rfc7677_example() {
        let client = ScramClient::new(ScramHash::Sha256, "user", "rOprNGfwEbeRWgbNEkqO".into());
        assert_eq!(client.client_first(), "n,,n=user,r=rOprNGfwEbeRWgbNEkqO");
        let server_first = b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,\
                             s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096";
        let (client_final, check) = client.client_final(server_first, "pencil").unwrap();
        assert_eq!(
            client_final,
            "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,\
             p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
        );
        check
            .verify(b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=")
            .unwrap();
        // One bit off in the signature: refused.
        assert!(matches!(
            check.verify(b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G5="),
            Err(ScramError::Protocol(_))
        ));
        assert_eq!(
            check.verify(b"e=invalid-proof"),
            Err(ScramError::Rejected("invalid-proof".into()))
        );
        // The same server-first with another password gives another proof.
        let (other, _) = client.client_final(server_first, "pencil2").unwrap();
        assert_ne!(other, client_final);
    }

    #[test]
    fn hostile_server_first_messages_are_refused() {
        let client = ScramClient::new(ScramHash::Sha512, "a=b,c", "abc".into());
        assert_eq!(client.client_first(), "n,,n=a=3Db=2Cc,r=abc");
        for bad in [
            &b"r=abc,s=c2FsdA==,i=4096"[..], // the nonce must grow
            b"r=xyzabc,s=c2FsdA==,i=4096",   // and start with kpscd's
            b"r=abcd,s=c2FsdA==,i=0",
            b"r=abcd,s=c2FsdA==,i=100000000",
            b"r=abcd,s=!!!,i=4096",
            b"r=abcd,i=4096",
            b"m=ext,r=abcd,s=c2FsdA==,i=4096",
            b"\xff",
        ] {
            assert!(
                matches!(client.client_final(bad, "pw"), Err(ScramError::Protocol(_))),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        client
            .client_final(b"r=abcd,s=c2FsdA==,i=4096,x=future", "pw")
            .unwrap();
    }

    #[test]
    fn nonces_are_fresh() {
        let (a, b) = (new_nonce().unwrap(), new_nonce().unwrap());
        assert_ne!(a, b);
        assert_eq!(a.len(), 32);
        assert!(!a.contains(','));
    }
}
