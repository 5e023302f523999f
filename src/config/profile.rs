//! The active Prefect profile, laid under the process environment as Prefect lays it:
//! environment over profile over defaults.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::ConfigError;
use super::env::Env;
use super::env_table as var;

/// Prefect 3.9.1's packaged `profiles.toml`, used when the user has none (as Prefect does):
/// its active `ephemeral` profile sets `PREFECT_SERVER_EPHEMERAL_ENABLED`, which the reference
/// then passes into every flow-run container.
const DEFAULT_PROFILES: &str = r#"active = "ephemeral"

[profiles.ephemeral]
PREFECT_SERVER_EPHEMERAL_ENABLED = "true"

[profiles.local]
PREFECT_API_URL = "http://127.0.0.1:4200/api"

[profiles.test]
PREFECT_SERVER_EPHEMERAL_ENABLED = "true"
PREFECT_SERVER_DATABASE_CONNECTION_URL = "sqlite+aiosqlite:///:memory:"

[profiles.cloud]
"#;

/// The process environment with the active Prefect profile underneath, as Prefect resolves
/// settings: environment over profile over defaults. The profile is
/// `$PREFECT_PROFILES_PATH` (default `$PREFECT_HOME/profiles.toml`, `PREFECT_HOME` default
/// `~/.prefect`); `PREFECT_PROFILE` selects it, else the file's `active`.
///
/// # Errors
/// [`ConfigError::Profiles`] for an unreadable or malformed file, or a selected profile that
/// does not exist.
pub fn with_profile(
    process_env: BTreeMap<String, String>,
) -> Result<BTreeMap<String, String>, ConfigError> {
    let mut merged = active_profile(&Env::new(&process_env))?;
    merged.extend(process_env);
    Ok(merged)
}

/// The settings of the active profile; none when there is no profile to read.
pub(super) fn active_profile(env: &Env) -> Result<BTreeMap<String, String>, ConfigError> {
    let home = env.raw(&var::PREFECT_HOME).map(PathBuf::from).or_else(|| {
        env.raw(&var::HOME)
            .map(|h| PathBuf::from(h).join(".prefect"))
    });
    let explicit_path = env.raw(&var::PREFECT_PROFILES_PATH);
    let path = match (explicit_path, home) {
        (Some(p), _) => PathBuf::from(p),
        (None, Some(h)) => h.join("profiles.toml"),
        (None, None) => return Ok(BTreeMap::new()),
    };
    let Some(text) = read_profiles(&path, explicit_path.is_some())? else {
        return Ok(BTreeMap::new());
    };
    let doc: toml::Table = toml::from_str(&text).map_err(|e| ConfigError::Profiles {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    let chosen = env.raw(&var::PREFECT_PROFILE);
    let selected = chosen.cloned().or_else(|| {
        doc.get("active")
            .and_then(|a| a.as_str())
            .map(str::to_owned)
    });
    let Some(selected) = selected else {
        return Ok(BTreeMap::new());
    };
    let profile = doc
        .get("profiles")
        .and_then(|p| p.get(&selected))
        .and_then(|p| p.as_table());
    match profile {
        Some(profile) => Ok(profile_values(profile)),
        None if chosen.is_some() => Err(ConfigError::Profiles {
            path,
            reason: format!("profile '{selected}' not found"),
        }),
        None => Ok(BTreeMap::new()),
    }
}

/// The profiles file's text; Prefect's packaged defaults when the default file is missing,
/// `None` when a file named by `PREFECT_PROFILES_PATH` is.
fn read_profiles(path: &Path, explicit_path: bool) -> Result<Option<String>, ConfigError> {
    match std::fs::read_to_string(path) {
        Ok(t) => Ok(Some(t)),
        // Like Prefect: with no profiles file of the user's, its packaged defaults apply.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit_path => {
            Ok(Some(DEFAULT_PROFILES.to_owned()))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(ConfigError::Profiles {
            path: path.to_owned(),
            reason: e.to_string(),
        }),
    }
}

/// A profile's settings as the strings an environment would hold.
fn profile_values(profile: &toml::Table) -> BTreeMap<String, String> {
    profile
        .iter()
        .map(|(k, v)| {
            let value = match v {
                toml::Value::String(s) => s.clone(),
                toml::Value::Integer(i) => i.to_string(),
                toml::Value::Float(f) => f.to_string(),
                toml::Value::Boolean(b) => b.to_string(),
                other => serde_json::to_string(other).unwrap_or_default(),
            };
            (k.clone(), value)
        })
        .collect()
}
