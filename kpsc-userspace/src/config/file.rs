//! The TOML file (`--config`): the same settings as the flags of the mode it is given to.
//! Its keys are derived from that mode's clap declaration, so no key is declared twice and
//! a key the mode does not take (e.g. `bulk_policy` under portmap) is refused by name.

use std::path::Path;

use serde::de::DeserializeOwned;

use crate::config::error::ConfigError;

/// The file keys of the mode whose flags are `A`: each long flag with `_` for `-`.
pub fn keys<A: clap::Args>() -> Vec<String> {
    A::augment_args(clap::Command::new("kpscd"))
        .get_arguments()
        .filter_map(|arg| arg.get_long())
        .filter(|long| *long != "config")
        .map(|long| long.replace('-', "_"))
        .collect()
}

/// Reads the file for the mode whose flags are `A` (default values when no file is given).
pub fn load<A: clap::Args + DeserializeOwned + Default>(
    path: Option<&Path>,
) -> Result<A, ConfigError> {
    let Some(path) = path else {
        return Ok(A::default());
    };
    let error = |message: String| ConfigError::new("--config", message);
    let text = std::fs::read_to_string(path)
        .map_err(|e| error(format!("cannot read {}: {e}", path.display())))?;
    let table: toml::Table =
        toml::from_str(&text).map_err(|e| error(format!("{}: {e}", path.display())))?;
    let allowed = keys::<A>();
    if let Some(key) = table.keys().find(|k| !allowed.contains(k)) {
        return Err(error(format!(
            "{}: unknown key `{key}` for this mode (keys: {})",
            path.display(),
            allowed.join(", ")
        )));
    }
    A::deserialize(toml::Value::Table(table)).map_err(|e| error(format!("{}: {e}", path.display())))
}

/// Flags win over the file, the file over the default.
pub fn pick<T>(flag: Option<T>, file: Option<T>) -> Option<T> {
    flag.or(file)
}

/// A repeatable flag given at least once replaces the file's list.
pub fn pick_list<T>(flag: Vec<T>, file: Vec<T>) -> Vec<T> {
    if flag.is_empty() { file } else { flag }
}
