//! Value types of flags used by both modes, each parsed the same way from a flag and from
//! the file.

use std::{fmt, str::FromStr, time::Duration};

use serde::Deserialize;

/// `--log-format`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// `--log-level`; kafka-proxy's `warning`, `fatal` and `panic` are accepted as aliases.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    Trace,
    Debug,
    #[default]
    Info,
    #[value(alias = "warning")]
    #[serde(alias = "warning")]
    Warn,
    #[value(alias = "fatal", alias = "panic")]
    #[serde(alias = "fatal", alias = "panic")]
    Error,
}

impl LogLevel {
    /// The `tracing` filter directive.
    pub fn directive(self) -> &'static str {
        match self {
            Self::Trace => "trace",
            Self::Debug => "debug",
            Self::Info => "info",
            Self::Warn => "warn",
            Self::Error => "error",
        }
    }
}

/// A duration written like `15s`, `1m` or `500ms`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl FromStr for HumanDuration {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        humantime::parse_duration(s.trim())
            .map(Self)
            .map_err(|e| format!("{s:?} is not a duration like 15s or 1m: {e}"))
    }
}

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", humantime::format_duration(self.0))
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_from_flags_and_files() {
        assert_eq!(
            "15s".parse::<HumanDuration>().unwrap().0,
            Duration::from_secs(15)
        );
        assert!("soon".parse::<HumanDuration>().is_err());
        #[derive(Deserialize)]
        struct F {
            d: HumanDuration,
        }
        let f: F = toml::from_str("d = \"2m\"").unwrap();
        assert_eq!(f.d.0, Duration::from_secs(120));
        assert!(toml::from_str::<F>("d = \"later\"").is_err());
    }

    #[test]
    fn kafka_proxy_log_levels_are_accepted() {
        use clap::ValueEnum;
        for (text, level) in [
            ("warning", LogLevel::Warn),
            ("fatal", LogLevel::Error),
            ("panic", LogLevel::Error),
            ("debug", LogLevel::Debug),
        ] {
            assert_eq!(LogLevel::from_str(text, true).unwrap(), level);
            #[derive(Deserialize)]
            struct F {
                l: LogLevel,
            }
            let f: F = toml::from_str(&format!("l = \"{text}\"")).unwrap();
            assert_eq!(f.l, level);
        }
    }
}
