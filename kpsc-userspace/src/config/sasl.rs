//! SASL credentials kpscd itself uses towards brokers:
//! - `--discovery-sasl-*` (kpsc's own): discovery, refresh and probes authenticate; clients'
//!   own SASL passes through untouched;
//! - kafka-proxy's `--sasl-enable` family: kpscd authenticates every upstream connection
//!   (clients send no SASL), and its own connections use the same credentials.
//!
//! Passwords come from a file or an environment variable; kafka-proxy's `--sasl-password`
//! on the command line is accepted for compatibility only (visible in `ps`). A password is
//! held in [`Secret`], whose Debug output is redacted, so it cannot reach a log or an
//! error by accident.

use std::{fmt, path::PathBuf};

use clap::Args;
use serde::Deserialize;

use crate::config::{error::ConfigError, file::pick};

/// The SASL mechanisms kpscd speaks towards brokers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Deserialize)]
pub enum SaslMechanism {
    #[value(name = "PLAIN")]
    #[serde(rename = "PLAIN")]
    Plain,
    #[value(name = "SCRAM-SHA-256")]
    #[serde(rename = "SCRAM-SHA-256")]
    ScramSha256,
    #[value(name = "SCRAM-SHA-512")]
    #[serde(rename = "SCRAM-SHA-512")]
    ScramSha512,
}

impl SaslMechanism {
    /// The name brokers know it by (SaslHandshake).
    pub fn name(self) -> &'static str {
        match self {
            Self::Plain => "PLAIN",
            Self::ScramSha256 => "SCRAM-SHA-256",
            Self::ScramSha512 => "SCRAM-SHA-512",
        }
    }
}

impl fmt::Display for SaslMechanism {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A password: readable only through [`Secret::expose`], redacted in Debug, no Display.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// Who kpscd authenticates as, and how.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SaslCredentials {
    pub mechanism: SaslMechanism,
    pub username: String,
    pub password: Secret,
}

/// kpsc's own flags for its discovery, refresh and probe connections.
#[derive(Args, Deserialize, Debug, Default, Clone)]
#[serde(default)]
pub struct DiscoverySaslArgs {
    /// SASL mechanism kpscd's own connections (discovery, metadata refresh, probes)
    /// authenticate with; clients' SASL still passes through untouched.
    #[arg(long = "discovery-sasl-mechanism", value_name = "MECHANISM")]
    pub discovery_sasl_mechanism: Option<SaslMechanism>,

    /// User for `--discovery-sasl-mechanism`.
    #[arg(long = "discovery-sasl-username", value_name = "USER")]
    pub discovery_sasl_username: Option<String>,

    /// File holding the password for `--discovery-sasl-username` (one trailing newline is
    /// ignored).
    #[arg(long = "discovery-sasl-password-file", value_name = "PATH")]
    pub discovery_sasl_password_file: Option<PathBuf>,

    /// Name of the environment variable holding that password.
    #[arg(long = "discovery-sasl-password-env", value_name = "NAME")]
    pub discovery_sasl_password_env: Option<String>,
}

/// kafka-proxy's "SASL by proxy" flags (kpscd proxy only).
#[derive(Args, Deserialize, Debug, Default, Clone)]
#[serde(default)]
pub struct ProxySaslArgs {
    /// Authenticate every connection to a broker (clients send no SASL); discovery,
    /// refresh and probes use the same credentials.
    #[arg(long = "sasl-enable", num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub sasl_enable: Option<bool>,

    /// SASL user.
    #[arg(long = "sasl-username", value_name = "USER")]
    pub sasl_username: Option<String>,

    /// SASL password on the command line: accepted for kafka-proxy command lines, but
    /// visible to every local user; prefer --sasl-password-file or --sasl-password-env.
    #[arg(long = "sasl-password", value_name = "PASSWORD")]
    pub sasl_password: Option<String>,

    /// File holding the SASL password (one trailing newline is ignored).
    #[arg(long = "sasl-password-file", value_name = "PATH")]
    pub sasl_password_file: Option<PathBuf>,

    /// Name of the environment variable holding the SASL password.
    #[arg(long = "sasl-password-env", value_name = "NAME")]
    pub sasl_password_env: Option<String>,

    /// SASL mechanism: PLAIN (kafka-proxy's default), SCRAM-SHA-256 or SCRAM-SHA-512.
    #[arg(long = "sasl-method", value_name = "MECHANISM")]
    pub sasl_method: Option<SaslMechanism>,

    /// JAAS file with `username="..."` and `password="..."` (kafka-proxy's format: each
    /// exactly once); takes the place of --sasl-username and the password flags.
    #[arg(long = "sasl-jaas-config-file", value_name = "PATH")]
    pub sasl_jaas_config_file: Option<PathBuf>,
}

/// The kafka-proxy SASL flags, resolved.
#[derive(Clone, Debug, Default)]
pub struct ProxySasl {
    /// Set with `--sasl-enable`.
    pub credentials: Option<SaslCredentials>,
    /// The password came from `--sasl-password` on the command line: worth a warning
    /// once logging is up.
    pub password_on_argv: bool,
}

impl DiscoverySaslArgs {
    /// `None` when no `--discovery-sasl-*` flag is set.
    pub fn resolve(
        flags: Self,
        file: Self,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Option<SaslCredentials>, ConfigError> {
        let mechanism = pick(
            flags.discovery_sasl_mechanism,
            file.discovery_sasl_mechanism,
        );
        let username = pick(flags.discovery_sasl_username, file.discovery_sasl_username);
        let password_file = pick(
            flags.discovery_sasl_password_file,
            file.discovery_sasl_password_file,
        );
        let password_env = pick(
            flags.discovery_sasl_password_env,
            file.discovery_sasl_password_env,
        );
        let Some(mechanism) = mechanism else {
            if let Some(flag) = [
                (username.is_some(), "--discovery-sasl-username"),
                (password_file.is_some(), "--discovery-sasl-password-file"),
                (password_env.is_some(), "--discovery-sasl-password-env"),
            ]
            .iter()
            .find_map(|(set, flag)| set.then_some(*flag))
            {
                return Err(ConfigError::new(
                    flag,
                    "needs --discovery-sasl-mechanism (PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512)",
                ));
            }
            return Ok(None);
        };
        let username = username.ok_or_else(|| {
            ConfigError::new(
                "--discovery-sasl-username",
                "required with --discovery-sasl-mechanism",
            )
        })?;
        let password = match (password_file, password_env) {
            (Some(path), None) => read_password_file(&path, "--discovery-sasl-password-file")?,
            (None, Some(name)) => read_password_env(&name, "--discovery-sasl-password-env", env)?,
            (Some(_), Some(_)) => {
                return Err(ConfigError::new(
                    "--discovery-sasl-password-env",
                    "give the password once: --discovery-sasl-password-file or \
                     --discovery-sasl-password-env",
                ));
            }
            (None, None) => {
                return Err(ConfigError::new(
                    "--discovery-sasl-password-file",
                    "--discovery-sasl-mechanism needs a password: \
                     --discovery-sasl-password-file PATH or --discovery-sasl-password-env NAME",
                ));
            }
        };
        credentials(mechanism, username, password, "--discovery-sasl-username")
    }
}

impl ProxySaslArgs {
    pub fn resolve(
        flags: Self,
        file: Self,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<ProxySasl, ConfigError> {
        let password_on_argv = flags.sasl_password.is_some();
        let enable = pick(flags.sasl_enable, file.sasl_enable).unwrap_or(false);
        let username = pick(flags.sasl_username, file.sasl_username);
        let method = pick(flags.sasl_method, file.sasl_method);
        let jaas = pick(flags.sasl_jaas_config_file, file.sasl_jaas_config_file);
        // Every way of giving the password, with its flag.
        let sources: Vec<(&str, PasswordSource)> = [
            (
                "--sasl-password",
                pick(flags.sasl_password, file.sasl_password).map(PasswordSource::Value),
            ),
            (
                "--sasl-password-file",
                pick(flags.sasl_password_file, file.sasl_password_file).map(PasswordSource::File),
            ),
            (
                "--sasl-password-env",
                pick(flags.sasl_password_env, file.sasl_password_env).map(PasswordSource::Env),
            ),
        ]
        .into_iter()
        .filter_map(|(flag, source)| source.map(|s| (flag, s)))
        .collect();
        if !enable {
            // kafka-proxy ignores these without --sasl-enable; a silently unused password
            // is more likely a mistake than intent.
            let given = [
                (username.is_some(), "--sasl-username"),
                (method.is_some(), "--sasl-method"),
                (jaas.is_some(), "--sasl-jaas-config-file"),
            ]
            .into_iter()
            .chain(sources.iter().map(|(flag, _)| (true, *flag)))
            .find_map(|(set, flag)| set.then_some(flag));
            if let Some(flag) = given {
                return Err(ConfigError::new(
                    flag,
                    "has no effect without --sasl-enable (kpscd authenticating every broker \
                     connection itself); for kpscd's own connections only, use \
                     --discovery-sasl-*",
                ));
            }
            return Ok(ProxySasl::default());
        }
        let mechanism = method.unwrap_or(SaslMechanism::Plain);
        let (username, password, user_flag) = if let Some(path) = jaas {
            if username.is_some() {
                return Err(ConfigError::new(
                    "--sasl-username",
                    "--sasl-jaas-config-file already names the user: drop one of the two",
                ));
            }
            if let Some((flag, _)) = sources.first() {
                return Err(ConfigError::new(
                    flag,
                    "--sasl-jaas-config-file already holds the password: drop one of the two",
                ));
            }
            let text = std::fs::read_to_string(&path).map_err(|e| {
                ConfigError::new(
                    "--sasl-jaas-config-file",
                    format!("cannot read {}: {e}", path.display()),
                )
            })?;
            let (username, password) = parse_jaas(&text).map_err(|e| {
                ConfigError::new(
                    "--sasl-jaas-config-file",
                    format!("{}: {e}", path.display()),
                )
            })?;
            (username, password, "--sasl-jaas-config-file")
        } else {
            let username = username.ok_or_else(|| {
                ConfigError::new(
                    "--sasl-username",
                    "required with --sasl-enable (or --sasl-jaas-config-file)",
                )
            })?;
            let password = match sources.as_slice() {
                [(flag, source)] => source.read(flag, env)?,
                [] => {
                    return Err(ConfigError::new(
                        "--sasl-password-file",
                        "--sasl-enable needs a password: --sasl-password-file PATH, \
                         --sasl-password-env NAME or --sasl-jaas-config-file PATH",
                    ));
                }
                [_, (flag, _), ..] => {
                    return Err(ConfigError::new(
                        flag,
                        "give the password once (--sasl-password, --sasl-password-file or \
                         --sasl-password-env)",
                    ));
                }
            };
            (username, password, "--sasl-username")
        };
        Ok(ProxySasl {
            credentials: credentials(mechanism, username, password, user_flag)?,
            password_on_argv,
        })
    }
}

enum PasswordSource {
    Value(String),
    File(PathBuf),
    Env(String),
}

impl PasswordSource {
    fn read(
        &self,
        flag: &str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Secret, ConfigError> {
        match self {
            Self::Value(value) => Ok(Secret::new(value.clone())),
            Self::File(path) => read_password_file(path, flag),
            Self::Env(name) => read_password_env(name, flag, env),
        }
    }
}

fn credentials(
    mechanism: SaslMechanism,
    username: String,
    password: Secret,
    user_flag: &str,
) -> Result<Option<SaslCredentials>, ConfigError> {
    if username.is_empty() {
        return Err(ConfigError::new(user_flag, "the user name is empty"));
    }
    // NUL separates PLAIN's fields (RFC 4616); no mechanism allows it in a name.
    if username.contains('\0') {
        return Err(ConfigError::new(user_flag, "the user name contains NUL"));
    }
    Ok(Some(SaslCredentials {
        mechanism,
        username,
        password,
    }))
}

/// The password in `path`: its text without one trailing newline (what `echo` and most
/// secret mounts leave); empty is an error.
fn read_password_file(path: &std::path::Path, flag: &str) -> Result<Secret, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError::new(flag, format!("cannot read {}: {e}", path.display())))?;
    let password = text
        .strip_suffix('\n')
        .map(|t| t.strip_suffix('\r').unwrap_or(t))
        .unwrap_or(&text);
    check_password(password, flag, &format!("{} holds", path.display()))
}

fn read_password_env(
    name: &str,
    flag: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Secret, ConfigError> {
    let value = env(name).ok_or_else(|| {
        ConfigError::new(
            flag,
            format!("environment variable {name} is not set (or not UTF-8)"),
        )
    })?;
    check_password(&value, flag, &format!("environment variable {name} holds"))
}

fn check_password(password: &str, flag: &str, what: &str) -> Result<Secret, ConfigError> {
    if password.is_empty() {
        return Err(ConfigError::new(flag, format!("{what} an empty password")));
    }
    if password.contains('\0') {
        return Err(ConfigError::new(
            flag,
            format!("{what} a password with NUL"),
        ));
    }
    Ok(Secret::new(password))
}

/// kafka-proxy's reading of a JAAS file: `username = "..."` and `password = "..."` (blanks
/// around `=` allowed, the value within one line, trimmed), each exactly once.
fn parse_jaas(text: &str) -> Result<(String, Secret), String> {
    let username = jaas_value(text, "username")
        .map_err(|e| format!("cannot retrieve the JAAS username: {e}"))?;
    let password = jaas_value(text, "password")
        .map_err(|e| format!("cannot retrieve the JAAS password: {e}"))?;
    Ok((username, Secret::new(password)))
}

fn jaas_value(text: &str, key: &str) -> Result<String, &'static str> {
    let mut found = Vec::new();
    for (at, _) in text.match_indices(key) {
        let rest = text[at + key.len()..].trim_start_matches([' ', '\t']);
        let Some(rest) = rest.strip_prefix('=') else {
            continue;
        };
        let rest = rest.trim_start_matches([' ', '\t']);
        let Some(rest) = rest.strip_prefix('"') else {
            continue;
        };
        let line = rest.split('\n').next().unwrap_or_default();
        if let Some(end) = line.find('"') {
            found.push(&line[..end]);
        }
    }
    match found.as_slice() {
        [] => Err("no entry was found"),
        [value] if value.trim().is_empty() => Err("attribute is empty"),
        [value] => Ok(value.trim().to_owned()),
        _ => Err("multiple entries were found"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn temp_file(name: &str, text: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("kpsc-sasl-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn secrets_are_redacted_in_debug() {
        let creds = SaslCredentials {
            mechanism: SaslMechanism::ScramSha256,
            username: "alice".into(),
            password: Secret::new("s3cret-value"),
        };
        let shown = format!("{creds:?} {:?}", creds.password);
        assert!(!shown.contains("s3cret-value"), "{shown}");
        assert!(
            shown.contains("alice") && shown.contains("redacted"),
            "{shown}"
        );
    }

    /// kafka-proxy's own JAAS examples read the same here.
    #[test]
    fn jaas_files_read_as_kafka_proxy_reads_them() {
        let jaas = "\n\t\tKafkaClient {\n\t\t  org.apache.kafka.common.security.plain.PlainLoginModule required\n\t\t  username   = \"alice\"\n\t\t  password\t= \"veyaiThai5que0ieb5le\";\n\t\t};\n";
        let (user, password) = parse_jaas(jaas).unwrap();
        assert_eq!(user, "alice");
        assert_eq!(password.expose(), "veyaiThai5que0ieb5le");
        let missing = "KafkaClient { x required username=\"alice\"; };";
        assert_eq!(
            parse_jaas(missing).unwrap_err(),
            "cannot retrieve the JAAS password: no entry was found"
        );
        let twice = "username = \"alice\"  username = \"alice2\"\n password=\"p\";";
        assert_eq!(
            parse_jaas(twice).unwrap_err(),
            "cannot retrieve the JAAS username: multiple entries were found"
        );
        assert!(parse_jaas("username=\"\" password=\"p\"").is_err());
    }

    #[test]
    fn discovery_credentials_come_from_a_file_or_the_environment() {
        let path = temp_file("discovery-password", "s3cret\n");
        let args = DiscoverySaslArgs {
            discovery_sasl_mechanism: Some(SaslMechanism::ScramSha512),
            discovery_sasl_username: Some("alice".into()),
            discovery_sasl_password_file: Some(path),
            discovery_sasl_password_env: None,
        };
        let creds = DiscoverySaslArgs::resolve(args.clone(), Default::default(), &no_env)
            .unwrap()
            .unwrap();
        assert_eq!(creds.password.expose(), "s3cret");
        assert_eq!(creds.mechanism.name(), "SCRAM-SHA-512");

        let from_env = DiscoverySaslArgs {
            discovery_sasl_password_file: None,
            discovery_sasl_password_env: Some("KPSC_TEST_PW".into()),
            ..args.clone()
        };
        let env = |name: &str| (name == "KPSC_TEST_PW").then(|| "from-env".to_owned());
        let creds = DiscoverySaslArgs::resolve(from_env.clone(), Default::default(), &env)
            .unwrap()
            .unwrap();
        assert_eq!(creds.password.expose(), "from-env");
        let err = DiscoverySaslArgs::resolve(from_env, Default::default(), &no_env).unwrap_err();
        assert_eq!(err.flag, "--discovery-sasl-password-env");
        assert!(err.message.contains("KPSC_TEST_PW"), "{err}");

        let flag = |args: DiscoverySaslArgs| {
            DiscoverySaslArgs::resolve(args, Default::default(), &no_env)
                .unwrap_err()
                .flag
        };
        assert_eq!(
            flag(DiscoverySaslArgs {
                discovery_sasl_password_file: None,
                ..args.clone()
            }),
            "--discovery-sasl-password-file"
        );
        assert_eq!(
            flag(DiscoverySaslArgs {
                discovery_sasl_username: None,
                ..args.clone()
            }),
            "--discovery-sasl-username"
        );
        assert_eq!(
            flag(DiscoverySaslArgs {
                discovery_sasl_mechanism: None,
                ..args.clone()
            }),
            "--discovery-sasl-username"
        );
        assert_eq!(
            flag(DiscoverySaslArgs {
                discovery_sasl_password_file: Some(temp_file("empty", "\n")),
                ..args
            }),
            "--discovery-sasl-password-file"
        );
        assert!(
            DiscoverySaslArgs::resolve(Default::default(), Default::default(), &no_env)
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn kafka_proxy_sasl_flags() {
        let enabled = ProxySaslArgs {
            sasl_enable: Some(true),
            sasl_username: Some("alice".into()),
            sasl_password: Some("on-argv".into()),
            ..Default::default()
        };
        let sasl = ProxySaslArgs::resolve(enabled.clone(), Default::default(), &no_env).unwrap();
        assert!(sasl.password_on_argv);
        let creds = sasl.credentials.unwrap();
        // kafka-proxy's default method.
        assert_eq!(creds.mechanism, SaslMechanism::Plain);
        assert_eq!(creds.password.expose(), "on-argv");

        // The same password from the TOML file is not on the command line.
        let sasl = ProxySaslArgs::resolve(
            ProxySaslArgs {
                sasl_password: None,
                ..enabled.clone()
            },
            ProxySaslArgs {
                sasl_password: Some("in-file".into()),
                ..Default::default()
            },
            &no_env,
        )
        .unwrap();
        assert!(!sasl.password_on_argv);

        let jaas = temp_file(
            "jaas.conf",
            "KafkaClient { m required username=\"bob\" password=\"pw\"; };",
        );
        let sasl = ProxySaslArgs::resolve(
            ProxySaslArgs {
                sasl_enable: Some(true),
                sasl_method: Some(SaslMechanism::ScramSha512),
                sasl_jaas_config_file: Some(jaas.clone()),
                ..Default::default()
            },
            Default::default(),
            &no_env,
        )
        .unwrap();
        let creds = sasl.credentials.unwrap();
        assert_eq!(
            (creds.username.as_str(), creds.password.expose()),
            ("bob", "pw")
        );

        let flag = |args: ProxySaslArgs| {
            ProxySaslArgs::resolve(args, Default::default(), &no_env)
                .unwrap_err()
                .flag
        };
        assert_eq!(
            flag(ProxySaslArgs {
                sasl_enable: None,
                ..enabled.clone()
            }),
            "--sasl-username"
        );
        assert_eq!(
            flag(ProxySaslArgs {
                sasl_password: None,
                ..enabled.clone()
            }),
            "--sasl-password-file"
        );
        assert_eq!(
            flag(ProxySaslArgs {
                sasl_password_env: Some("X".into()),
                ..enabled.clone()
            }),
            "--sasl-password-env"
        );
        assert_eq!(
            flag(ProxySaslArgs {
                sasl_jaas_config_file: Some(jaas),
                sasl_username: None,
                ..enabled
            }),
            "--sasl-password"
        );
    }
}
