//! kpscd authenticating itself to a broker: SaslHandshake v1, then SaslAuthenticate v1
//! frames carrying the mechanism's messages (PLAIN per RFC 4616, SCRAM per `scram`).
//!
//! Works over any byte stream (plain TCP today, TLS when that connector lands) and reads
//! exactly one response per request, so the stream is handed on with nothing buffered.
//! The broker's answers go through the guarded decoder like every other response.

use bytes::Bytes;
use kafka_protocol::{
    messages::{
        ApiKey, SaslAuthenticateRequest, SaslAuthenticateResponse, SaslHandshakeRequest,
        SaslHandshakeResponse,
    },
    protocol::{Decodable, Encodable, HeaderVersion, StrBytes},
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::{
    config::sasl::{SaslCredentials, SaslMechanism},
    kafka::{
        frame::{frame_size, write_frame},
        guarded::decode_response,
        layout::{BYTES, I16, I64, STR, Schema, Ty, all, since},
        request::encode_request,
        scram::{ScramClient, ScramError, ScramHash, new_nonce},
    },
};

const HANDSHAKE_VERSION: i16 = 1;
const AUTHENTICATE_VERSION: i16 = 1;
/// SASL answers are a few hundred bytes; anything near this is not one.
const MAX_RESPONSE: u32 = 64 * 1024;
const CLIENT_ID: &str = "kpsc";

/// SaslHandshake response (Kafka 4.1 schema, never flexible).
const HANDSHAKE_SCHEMA: Schema = Schema {
    flexible_from: i16::MAX,
    fields: &[
        all("error_code", I16),
        all("mechanisms", Ty::Array(&[all("mechanism", STR)])),
    ],
};

/// SaslAuthenticate response (Kafka 4.1 schema, flexible from v2).
const AUTHENTICATE_SCHEMA: Schema = Schema {
    flexible_from: 2,
    fields: &[
        all("error_code", I16),
        all("error_message", STR),
        all("auth_bytes", BYTES),
        since(1, "session_lifetime_ms", I64),
    ],
};

#[derive(Debug, thiserror::Error)]
pub enum SaslError {
    /// The broker refused these credentials.
    #[error(
        "SASL authentication failed for user {user} at broker {broker} ({mechanism}): {reason}"
    )]
    Rejected {
        user: String,
        broker: String,
        mechanism: SaslMechanism,
        reason: String,
    },
    /// The exchange itself failed (I/O, a mechanism the broker does not enable, a broken
    /// or forged answer).
    #[error("SASL {mechanism} exchange with broker {broker} failed: {reason}")]
    Exchange {
        broker: String,
        mechanism: SaslMechanism,
        reason: String,
    },
}

/// Authenticates `stream` to `broker` (its name for errors) as `creds`. On success the
/// stream carries ordinary Kafka requests from here on.
pub async fn authenticate<S>(
    stream: &mut S,
    creds: &SaslCredentials,
    broker: &str,
) -> Result<(), SaslError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let exchange = |reason: String| SaslError::Exchange {
        broker: broker.to_owned(),
        mechanism: creds.mechanism,
        reason,
    };
    let rejected = |reason: String| SaslError::Rejected {
        user: creds.username.clone(),
        broker: broker.to_owned(),
        mechanism: creds.mechanism,
        reason,
    };
    let mut conn = Exchange { stream, next_id: 1 };

    let handshake = conn
        .call::<_, SaslHandshakeResponse>(
            ApiKey::SaslHandshake,
            HANDSHAKE_VERSION,
            &SaslHandshakeRequest::default()
                .with_mechanism(StrBytes::from_static_str(creds.mechanism.name())),
            &HANDSHAKE_SCHEMA,
        )
        .await
        .map_err(exchange)?;
    if handshake.error_code != 0 {
        let offered: Vec<&str> = handshake.mechanisms.iter().map(|m| m.as_str()).collect();
        return Err(exchange(format!(
            "the broker does not enable it (error code {}; it offers {offered:?})",
            handshake.error_code
        )));
    }

    match creds.mechanism {
        SaslMechanism::Plain => {
            let message = plain_message(&creds.username, creds.password.expose())
                .map_err(|e| exchange(e.to_owned()))?;
            conn.authenticate(message).await.map_err(|e| match e {
                Step::Refused(reason) => rejected(reason),
                Step::Failed(reason) => exchange(reason),
            })?;
        }
        SaslMechanism::ScramSha256 | SaslMechanism::ScramSha512 => {
            let hash = if creds.mechanism == SaslMechanism::ScramSha256 {
                ScramHash::Sha256
            } else {
                ScramHash::Sha512
            };
            let client = ScramClient::new(
                hash,
                &creds.username,
                new_nonce().map_err(|e| exchange(e.to_string()))?,
            );
            let step_error = |e: Step| match e {
                Step::Refused(reason) => rejected(reason),
                Step::Failed(reason) => exchange(reason),
            };
            let scram_error = |e: ScramError| match e {
                ScramError::Rejected(reason) => rejected(reason),
                ScramError::Protocol(reason) => exchange(reason),
            };
            let server_first = conn
                .authenticate(client.client_first().into_bytes())
                .await
                .map_err(step_error)?;
            let (client_final, check) = client
                .client_final(&server_first, creds.password.expose())
                .map_err(scram_error)?;
            let server_final = conn
                .authenticate(client_final.into_bytes())
                .await
                .map_err(step_error)?;
            check.verify(&server_final).map_err(scram_error)?;
        }
    }
    Ok(())
}

/// RFC 4616: `[authzid] NUL authcid NUL passwd`, no authzid; neither part may hold NUL
/// or be empty.
pub fn plain_message(username: &str, password: &str) -> Result<Vec<u8>, &'static str> {
    if username.is_empty() || password.is_empty() {
        return Err("PLAIN needs a non-empty user name and password");
    }
    if username.contains('\0') || password.contains('\0') {
        return Err("PLAIN user names and passwords cannot contain NUL");
    }
    let mut message = Vec::with_capacity(2 + username.len() + password.len());
    message.push(0);
    message.extend_from_slice(username.as_bytes());
    message.push(0);
    message.extend_from_slice(password.as_bytes());
    Ok(message)
}

/// How one SaslAuthenticate round ended badly.
enum Step {
    /// The broker answered with an error (wrong credentials, most likely).
    Refused(String),
    /// No usable answer.
    Failed(String),
}

struct Exchange<'s, S> {
    stream: &'s mut S,
    next_id: i32,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Exchange<'_, S> {
    /// One SaslAuthenticate round: sends `auth_bytes`, returns the broker's.
    async fn authenticate(&mut self, auth_bytes: Vec<u8>) -> Result<Bytes, Step> {
        let response = self
            .call::<_, SaslAuthenticateResponse>(
                ApiKey::SaslAuthenticate,
                AUTHENTICATE_VERSION,
                &SaslAuthenticateRequest::default().with_auth_bytes(Bytes::from(auth_bytes)),
                &AUTHENTICATE_SCHEMA,
            )
            .await
            .map_err(Step::Failed)?;
        if response.error_code != 0 {
            let message = response
                .error_message
                .as_ref()
                .map(|m| m.as_str())
                .filter(|m| !m.is_empty())
                .unwrap_or("no message");
            return Err(Step::Refused(format!(
                "{message} (error code {})",
                response.error_code
            )));
        }
        Ok(response.auth_bytes)
    }

    async fn call<Req, Resp>(
        &mut self,
        api: ApiKey,
        version: i16,
        request: &Req,
        schema: &Schema,
    ) -> Result<Resp, String>
    where
        Req: Encodable + HeaderVersion,
        Resp: Decodable,
    {
        let correlation_id = self.next_id;
        self.next_id += 1;
        let buf = encode_request(api, version, correlation_id, CLIENT_ID, request)
            .map_err(|e| format!("encoding {api:?}: {e}"))?;
        write_frame(self.stream, &buf)
            .await
            .and(self.stream.flush().await)
            .map_err(|e| format!("sending {api:?}: {e}"))?;
        let body = self
            .read_response()
            .await
            .map_err(|e| format!("reading the {api:?} response: {e}"))?;
        let frame = decode_response::<Resp>(
            api as i16,
            api.response_header_version(version),
            version,
            schema,
            body,
        )
        .map_err(|e| e.to_string())?;
        if frame.header.correlation_id != correlation_id {
            return Err(format!(
                "{api:?} response has correlation id {} instead of {correlation_id}",
                frame.header.correlation_id
            ));
        }
        Ok(frame.message)
    }

    /// Exactly one frame: nothing after it is read, so the stream can be handed on.
    async fn read_response(&mut self) -> Result<Bytes, String> {
        let mut prefix = [0u8; 4];
        self.stream
            .read_exact(&mut prefix)
            .await
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::UnexpectedEof => "the broker closed the connection".to_owned(),
                _ => e.to_string(),
            })?;
        let size = frame_size(prefix, MAX_RESPONSE, 4, "response").map_err(|e| e.to_string())?;
        let mut body = vec![0; size as usize];
        self.stream
            .read_exact(&mut body)
            .await
            .map_err(|e| format!("truncated response: {e}"))?;
        Ok(Bytes::from(body))
    }
}

#[cfg(test)]
mod tests {
    use bytes::BytesMut;
    use kafka_protocol::messages::ResponseHeader;

    use super::*;

    /// RFC 4616 section 4's examples: `\0tim\0tanstaaftanstaaf`; NUL and empty refused.
    #[test]
    fn plain_message_follows_rfc4616() {
        assert_eq!(
            plain_message("tim", "tanstaaftanstaaf").unwrap(),
            b"\0tim\0tanstaaftanstaaf"
        );
        // UTF-8 passes as its bytes (no SASLprep here; Kafka brokers compare bytes).
        assert_eq!(
            plain_message("\u{e9}", "p\u{e9}").unwrap(),
            b"\0\xc3\xa9\0p\xc3\xa9"
        );
        assert!(plain_message("", "x").is_err());
        assert!(plain_message("tim", "").is_err());
        assert!(plain_message("t\0im", "x").is_err());
        assert!(plain_message("tim", "x\0y").is_err());
    }

    fn response<T: Encodable>(id: i32, message: &T, version: i16, header: i16) -> Vec<u8> {
        let mut body = BytesMut::new();
        ResponseHeader::default()
            .with_correlation_id(id)
            .encode(&mut body, header)
            .unwrap();
        message.encode(&mut body, version).unwrap();
        let mut frame = (body.len() as i32).to_be_bytes().to_vec();
        frame.extend_from_slice(&body);
        frame
    }

    /// A scripted broker on an in-memory stream: PLAIN with the right password is
    /// accepted; the broker's refusal becomes the "authentication failed" error with its
    /// message, and the password appears in no error.
    #[tokio::test]
    async fn plain_exchange_and_refusal() {
        for (accept, expect_ok) in [(true, true), (false, false)] {
            let (mut kpsc, mut broker) = tokio::io::duplex(4096);
            let server = tokio::spawn(async move {
                let mut requests = Vec::new();
                for id in 1..=2 {
                    let mut size = [0; 4];
                    broker.read_exact(&mut size).await.unwrap();
                    let mut body = vec![0; i32::from_be_bytes(size) as usize];
                    broker.read_exact(&mut body).await.unwrap();
                    requests.push(body);
                    let frame = if id == 1 {
                        response(
                            1,
                            &SaslHandshakeResponse::default()
                                .with_mechanisms(vec![StrBytes::from_static_str("PLAIN")]),
                            1,
                            0,
                        )
                    } else {
                        let r = SaslAuthenticateResponse::default();
                        let r = if accept {
                            r
                        } else {
                            r.with_error_code(58).with_error_message(Some(
                                StrBytes::from_static_str(
                                    "Authentication failed: Invalid username or password",
                                ),
                            ))
                        };
                        response(2, &r, 1, 0)
                    };
                    broker.write_all(&frame).await.unwrap();
                }
                requests
            });
            let creds = SaslCredentials {
                mechanism: SaslMechanism::Plain,
                username: "alice".into(),
                password: crate::config::sasl::Secret::new("wonderland"),
            };
            let result = authenticate(&mut kpsc, &creds, "kafka-1:9092").await;
            let requests = server.await.unwrap();
            // api key 17 v1, then 36 v1 ending in the PLAIN message.
            assert_eq!(&requests[0][..4], &[0, 17, 0, 1]);
            assert_eq!(&requests[1][..4], &[0, 36, 0, 1]);
            assert!(requests[1].ends_with(b"\0alice\0wonderland"));
            if expect_ok {
                result.unwrap();
            } else {
                let err = result.unwrap_err().to_string();
                assert_eq!(
                    err,
                    "SASL authentication failed for user alice at broker kafka-1:9092 (PLAIN): \
                     Authentication failed: Invalid username or password (error code 58)"
                );
                assert!(!err.contains("wonderland"));
            }
        }
    }

    /// A handshake answer claiming 2^31 mechanisms is an error, not an abort.
    #[tokio::test]
    async fn hostile_handshake_answers_are_errors() {
        let (mut kpsc, mut broker) = tokio::io::duplex(4096);
        tokio::spawn(async move {
            let mut size = [0; 4];
            broker.read_exact(&mut size).await.unwrap();
            let mut body = vec![0; i32::from_be_bytes(size) as usize];
            broker.read_exact(&mut body).await.unwrap();
            let body = [&1i32.to_be_bytes()[..], &[0, 0], &[0x7f, 0xff, 0xff, 0xff]].concat();
            let mut frame = (body.len() as i32).to_be_bytes().to_vec();
            frame.extend_from_slice(&body);
            broker.write_all(&frame).await.unwrap();
        });
        let creds = SaslCredentials {
            mechanism: SaslMechanism::ScramSha256,
            username: "alice".into(),
            password: crate::config::sasl::Secret::new("pw"),
        };
        let err = authenticate(&mut kpsc, &creds, "b:1").await.unwrap_err();
        assert!(
            err.to_string().contains("mechanisms claims more entries"),
            "{err}"
        );
    }
}
