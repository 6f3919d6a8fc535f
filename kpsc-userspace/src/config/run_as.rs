//! `--user` / `--group`: the unprivileged identity `kpscd proxy` takes once its listeners
//! and admin endpoint are bound. Names are looked up here, at start, so a user that does
//! not exist is a configuration error naming the flag, not a failure after binding.

use clap::Args;
use nix::unistd::{Group, User};
use serde::Deserialize;

use crate::config::{error::ConfigError, file::pick};

#[derive(Args, Deserialize, Debug, Default, Clone)]
#[serde(default)]
pub struct RunAsArgs {
    /// Started as root, become this user (name or numeric id) once the listeners and the
    /// admin endpoint are bound. Files read later (certificate reloads) must be readable
    /// by this user.
    #[arg(long = "user", value_name = "USER")]
    pub user: Option<String>,

    /// Group to run as with `--user` (name or numeric id; default: the user's primary
    /// group). Supplementary groups are dropped.
    #[arg(long = "group", value_name = "GROUP")]
    pub group: Option<String>,
}

/// The identity to drop to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunAs {
    /// As given, for messages.
    pub user: String,
    pub uid: u32,
    pub gid: u32,
}

impl RunAs {
    pub fn resolve(flags: RunAsArgs, file: RunAsArgs) -> Result<Option<Self>, ConfigError> {
        let user = pick(flags.user, file.user);
        let group = pick(flags.group, file.group);
        let Some(user) = user else {
            return match group {
                Some(_) => Err(ConfigError::new(
                    "--group",
                    "needs --user (kpscd drops root to a user and group together)",
                )),
                None => Ok(None),
            };
        };
        let (uid, primary_gid) = lookup_user(&user)?;
        let gid = match group {
            Some(group) => lookup_group(&group)?,
            None => primary_gid.ok_or_else(|| {
                ConfigError::new(
                    "--user",
                    format!("{user} is a numeric id with no passwd entry: pass --group too"),
                )
            })?,
        };
        if uid == 0 {
            return Err(ConfigError::new(
                "--user",
                format!("{user} is root: name an unprivileged user, or leave --user out"),
            ));
        }
        Ok(Some(Self { user, uid, gid }))
    }
}

/// uid and, when the passwd database knows the user, its primary gid.
fn lookup_user(user: &str) -> Result<(u32, Option<u32>), ConfigError> {
    let found = User::from_name(user)
        .map_err(|e| ConfigError::new("--user", format!("looking up {user}: {e}")))?;
    match (found, user.parse::<u32>()) {
        (Some(u), _) => Ok((u.uid.as_raw(), Some(u.gid.as_raw()))),
        (None, Ok(uid)) => {
            let known = User::from_uid(uid.into())
                .map_err(|e| ConfigError::new("--user", format!("looking up uid {uid}: {e}")))?;
            Ok((uid, known.map(|u| u.gid.as_raw())))
        }
        (None, Err(_)) => Err(ConfigError::new(
            "--user",
            format!("no user named {user:?} on this system"),
        )),
    }
}

fn lookup_group(group: &str) -> Result<u32, ConfigError> {
    let found = Group::from_name(group)
        .map_err(|e| ConfigError::new("--group", format!("looking up {group}: {e}")))?;
    match (found, group.parse::<u32>()) {
        (Some(g), _) => Ok(g.gid.as_raw()),
        (None, Ok(gid)) => Ok(gid),
        (None, Err(_)) => Err(ConfigError::new(
            "--group",
            format!("no group named {group:?} on this system"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolve(user: Option<&str>, group: Option<&str>) -> Result<Option<RunAs>, ConfigError> {
        RunAs::resolve(
            RunAsArgs {
                user: user.map(str::to_owned),
                group: group.map(str::to_owned),
            },
            RunAsArgs::default(),
        )
    }

    #[test]
    fn names_and_ids_resolve_and_mistakes_name_their_flag() {
        // `nobody` and `nogroup` exist on every Debian system.
        let nobody = resolve(Some("nobody"), None).unwrap().unwrap();
        assert_eq!(nobody.uid, 65534);
        assert_eq!(nobody.gid, 65534);
        let by_id = resolve(Some("65534"), Some("nogroup")).unwrap().unwrap();
        assert_eq!((by_id.uid, by_id.gid), (65534, 65534));
        // An id without a passwd entry needs its group spelled out.
        let unknown_id = resolve(Some("4000123"), None).unwrap_err().to_string();
        assert!(
            unknown_id.contains("--user") && unknown_id.contains("--group"),
            "{unknown_id}"
        );
        assert_eq!(
            resolve(Some("4000123"), Some("4000123"))
                .unwrap()
                .unwrap()
                .gid,
            4000123
        );
        for (user, group, flag) in [
            (Some("no-such-user-kpsc"), None, "--user"),
            (Some("nobody"), Some("no-such-group-kpsc"), "--group"),
            (None, Some("nogroup"), "--group"),
            (Some("root"), None, "--user"),
            (Some("0"), Some("0"), "--user"),
        ] {
            let e = resolve(user, group).unwrap_err().to_string();
            assert!(e.contains(flag), "{user:?}/{group:?}: {e}");
        }
        assert_eq!(resolve(None, None).unwrap(), None);
    }
}
