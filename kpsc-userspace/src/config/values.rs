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

/// A size written like `600MiB`, `1GiB`, `65536` (bytes), or with KiB/KB-style suffixes
/// (binary multiples either way).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl FromStr for ByteSize {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let text = s.trim();
        let digits = text
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len());
        let (number, unit) = text.split_at(digits);
        let number: u64 = number
            .parse()
            .map_err(|_| format!("{s:?} is not a size like 600MiB or 1GiB"))?;
        let shift = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 0,
            "k" | "kb" | "kib" => 10,
            "m" | "mb" | "mib" => 20,
            "g" | "gb" | "gib" => 30,
            other => return Err(format!("{s:?}: unknown unit {other:?} (B, KiB, MiB, GiB)")),
        };
        number
            .checked_mul(1 << shift)
            .map(Self)
            .ok_or_else(|| format!("{s:?} is too large"))
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Bytes(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Bytes(n) => Ok(Self(n)),
            Raw::Text(text) => text.parse().map_err(serde::de::Error::custom),
        }
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
    fn sizes_parse_with_units() {
        assert_eq!("600MiB".parse::<ByteSize>().unwrap().0, 600 << 20);
        assert_eq!("1g".parse::<ByteSize>().unwrap().0, 1 << 30);
        assert_eq!("4096".parse::<ByteSize>().unwrap().0, 4096);
        assert!("lots".parse::<ByteSize>().is_err());
        assert!("5TiB".parse::<ByteSize>().is_err());
        #[derive(Deserialize)]
        struct F {
            a: ByteSize,
            b: ByteSize,
        }
        let f: F = toml::from_str("a = 1024\nb = \"2KiB\"").unwrap();
        assert_eq!((f.a.0, f.b.0), (1024, 2048));
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
