//! The one error type of configuration: which flag (or file key), and what is wrong.

/// Exit code for configuration errors (clap uses the same).
pub const EXIT_CONFIG: u8 = 2;

#[derive(Debug, thiserror::Error)]
#[error("invalid {flag}: {message}")]
pub struct ConfigError {
    pub flag: String,
    pub message: String,
}

impl ConfigError {
    pub fn new(flag: &str, message: impl Into<String>) -> Self {
        Self {
            flag: flag.to_owned(),
            message: message.into(),
        }
    }
}
