//! kafka-proxy flags kpsc does not implement: refused by name instead of being ignored, so a
//! pasted kafka-proxy command line never silently behaves differently.

use crate::config::error::ConfigError;

/// kafka-proxy `server` flags that kpsc does not implement (yet). They are rejected with a
/// clear message instead of being silently ignored.
pub const UNSUPPORTED_KAFKA_PROXY_FLAGS: &[(&str, &str)] = &[
    ("proxy-request-buffer-size", "kpsc sizes its buffers itself"),
    (
        "proxy-response-buffer-size",
        "kpsc sizes its buffers itself",
    ),
    ("proxy-listener-read-buffer-size", "not implemented yet"),
    ("proxy-listener-write-buffer-size", "not implemented yet"),
    ("proxy-listener-keep-alive", "not implemented yet"),
    (
        "proxy-listener-key-password",
        "not implemented yet (listener TLS takes a certificate and an unencrypted key)",
    ),
    (
        "proxy-listener-cipher-suites",
        "not implemented yet (listener TLS takes a certificate and an unencrypted key)",
    ),
    (
        "proxy-listener-curve-preferences",
        "not implemented yet (listener TLS takes a certificate and an unencrypted key)",
    ),
    (
        "auth-local-enable",
        "authentication plugins are not implemented",
    ),
    (
        "auth-gateway-client-enable",
        "authentication plugins are not implemented",
    ),
    (
        "auth-gateway-server-enable",
        "authentication plugins are not implemented",
    ),
    ("authz-enable", "authorization plugins are not implemented"),
    (
        "kafka-client-id",
        "kpsc forwards the client's own client id",
    ),
    ("kafka-write-timeout", "not implemented yet"),
    ("kafka-read-timeout", "not implemented yet"),
    ("kafka-keep-alive", "not implemented yet"),
    ("kafka-connection-read-buffer-size", "not implemented yet"),
    ("kafka-connection-write-buffer-size", "not implemented yet"),
    (
        "producer-acks-0-disabled",
        "kpsc detects acks=0 produce requests itself; drop the flag",
    ),
    (
        "tls-client-key-password",
        "not implemented yet (--tls-client-key-file takes an unencrypted key)",
    ),
    (
        "tls-same-client-cert-enable",
        "not implemented yet (kpscd does not compare client certificates with its own)",
    ),
    ("sasl-plugin-enable", "SASL plugins are not implemented"),
    (
        "debug-enable",
        "no pprof-style debug endpoint; use --log-level debug",
    ),
    ("debug-listen-address", "no pprof-style debug endpoint"),
    ("log-level-fieldname", "JSON field names are fixed"),
    ("log-time-fieldname", "JSON field names are fixed"),
    ("log-msg-fieldname", "JSON field names are fixed"),
    ("forward-proxy", "not implemented yet"),
];

/// Returns an error for the first kafka-proxy flag in `args` that kpsc does not support.
pub fn reject_unsupported_flags<S: AsRef<str>>(args: &[S]) -> Result<(), ConfigError> {
    for arg in args {
        let arg = arg.as_ref();
        let Some(name) = arg.strip_prefix("--") else {
            continue;
        };
        let name = name.split('=').next().unwrap_or(name);
        if let Some((flag, why)) = UNSUPPORTED_KAFKA_PROXY_FLAGS
            .iter()
            .find(|(flag, _)| *flag == name)
        {
            return Err(ConfigError::new(
                &format!("--{flag}"),
                format!("kafka-proxy flag not supported by kpsc: {why}"),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsupported_kafka_proxy_flags_are_rejected() {
        let err = reject_unsupported_flags(&["server", "--tls-client-key-password"]).unwrap_err();
        assert_eq!(err.flag, "--tls-client-key-password");
        reject_unsupported_flags(&["--tls-enable", "--proxy-listener-ca-chain-cert-file=x"])
            .unwrap();
        let err = reject_unsupported_flags(&["--sasl-plugin-enable=true"]).unwrap_err();
        assert_eq!(err.flag, "--sasl-plugin-enable");
        reject_unsupported_flags(&["--bootstrap-server-mapping", "a:1,b:2"]).unwrap();
    }
}
