//! Reading settings from an environment, only through the entries of [`super::env_table`].
//!
//! Every accessor takes an [`EnvVar`], not a name, and falls back to that entry's default, so
//! a variable cannot be read, or defaulted, anywhere but in the table. Each read is recorded,
//! so a test can check that every variable the settings code reads is in the table.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use super::ConfigError;
use super::env_table::EnvVar;

/// An environment (the process's with the Prefect profile underneath), read through the table.
pub(crate) struct Env<'a> {
    /// The variables.
    vars: &'a BTreeMap<String, String>,
    /// The name of every variable asked for: what the table test checks.
    read: RefCell<BTreeSet<&'static str>>,
}

impl<'a> Env<'a> {
    /// Reads `vars`.
    pub(crate) fn new(vars: &'a BTreeMap<String, String>) -> Self {
        Self {
            vars,
            read: RefCell::default(),
        }
    }

    /// The value as set, blank included.
    pub(crate) fn raw(&self, var: &EnvVar) -> Option<&'a String> {
        self.read.borrow_mut().insert(var.name);
        self.vars.get(var.name)
    }

    /// The value as set, unless it is unset or blank.
    pub(crate) fn non_empty(&self, var: &EnvVar) -> Option<String> {
        self.raw(var).filter(|v| !v.trim().is_empty()).cloned()
    }

    /// The value as set when not blank, else the table's default (blank for an absent one,
    /// which the parsers reject naming the variable, so a table mistake cannot pass unseen).
    pub(crate) fn text(&self, var: &EnvVar) -> String {
        self.non_empty(var)
            .unwrap_or_else(|| default_text(var).into_owned())
    }

    /// Like [`Env::text`], trimmed.
    fn trimmed(&self, var: &EnvVar) -> String {
        match self.raw(var).map(|s| s.trim()).filter(|s| !s.is_empty()) {
            Some(text) => text.to_owned(),
            None => default_text(var).into_owned(),
        }
    }

    /// A non-negative number of seconds, fractions allowed.
    pub(crate) fn seconds(&self, var: &EnvVar) -> Result<Duration, ConfigError> {
        let text = self.trimmed(var);
        // `try_`: a number of seconds too large for a `Duration` is an error, not a panic.
        text.parse::<f64>()
            .ok()
            .and_then(|v| Duration::try_from_secs_f64(v).ok())
            .ok_or_else(|| ConfigError::Invalid {
                name: var.name.to_owned(),
                value: text,
                reason: "expected a non-negative number of seconds".into(),
            })
    }

    /// A number of seconds that paces a loop (a poll, a heartbeat, a batch): at least `min`.
    /// Zero would make the loop spin against the API (or, for a tokio interval, panic), so it
    /// is a configuration error rather than something the worker quietly rounds up.
    pub(crate) fn interval(&self, var: &EnvVar, min: Duration) -> Result<Duration, ConfigError> {
        let value = self.seconds(var)?;
        if value < min || value.is_zero() {
            let shown = humantime::format_duration(min);
            return Err(ConfigError::Invalid {
                name: var.name.to_owned(),
                value: self.trimmed(var),
                reason: if min.is_zero() {
                    "an interval must be longer than 0 seconds".to_owned()
                } else {
                    format!("an interval must be at least {shown}")
                },
            });
        }
        Ok(value)
    }

    /// A boolean as Prefect's settings accept it (`true`/`false`, `1`/`0`, `yes`/`no`, …).
    pub(crate) fn boolean(&self, var: &EnvVar) -> Result<bool, ConfigError> {
        let text = self.trimmed(var).to_ascii_lowercase();
        match text.as_str() {
            "1" | "true" | "t" | "yes" | "y" | "on" => Ok(true),
            "0" | "false" | "f" | "no" | "n" | "off" => Ok(false),
            _ => Err(ConfigError::Invalid {
                name: var.name.to_owned(),
                value: text,
                reason: "expected true or false".into(),
            }),
        }
    }

    /// A non-negative whole number.
    pub(crate) fn count(&self, var: &EnvVar) -> Result<usize, ConfigError> {
        let text = self.text(var);
        text.trim().parse().map_err(|_| ConfigError::Invalid {
            name: var.name.into(),
            value: text.clone(),
            reason: "expected a whole number".into(),
        })
    }

    /// A non-negative whole number, the error naming the trimmed value (as Prefect's client
    /// retries setting always has).
    pub(crate) fn count_trimmed(&self, var: &EnvVar) -> Result<u32, ConfigError> {
        let text = self.trimmed(var);
        text.parse().map_err(|_| ConfigError::Invalid {
            name: var.name.into(),
            value: text.clone(),
            reason: "expected a whole number".into(),
        })
    }

    /// A human duration (`30m`, `24h`, `7d`, `1h 30m`, `0s`) from `flag` (which an error then
    /// names as `flag_name`), else from the variable, else its default; `None` when none is
    /// given and the default is absent.
    pub(crate) fn duration(
        &self,
        flag: Option<&str>,
        flag_name: &str,
        var: &EnvVar,
    ) -> Result<Option<Duration>, ConfigError> {
        let (name, text) = match flag {
            Some(text) => (flag_name, text.to_owned()),
            None => match self.non_empty(var) {
                Some(text) => (var.name, text),
                None => match var.default.value() {
                    Some(text) => (var.name, text.into_owned()),
                    None => return Ok(None),
                },
            },
        };
        humantime::parse_duration(text.trim())
            .map(Some)
            .map_err(|e| ConfigError::Invalid {
                name: name.to_owned(),
                value: text.clone(),
                reason: format!("expected a duration such as 30m, 24h or 7d ({e})"),
            })
    }

    /// Like [`Env::duration`] for a variable whose default is a value.
    pub(crate) fn required_duration(
        &self,
        flag: Option<&str>,
        flag_name: &str,
        var: &EnvVar,
    ) -> Result<Duration, ConfigError> {
        self.duration(flag, flag_name, var)?
            .ok_or_else(|| ConfigError::Invalid {
                name: var.name.to_owned(),
                value: String::new(),
                reason: "the table gives this variable no default".into(),
            })
    }

    /// Every `PREFECT_*` variable set, the worker's own internal `PREFECT__*` ones excepted:
    /// the Prefect settings handed to flow-run containers, not read as settings here.
    pub(crate) fn prefect_settings(&self) -> impl Iterator<Item = (&'a String, &'a String)> {
        self.vars
            .iter()
            .filter(|(k, _)| k.starts_with("PREFECT_") && !k.starts_with("PREFECT__"))
    }

    /// The names of the variables read so far.
    #[cfg(test)]
    pub(crate) fn read(&self) -> BTreeSet<&'static str> {
        self.read.borrow().clone()
    }
}

/// The default to parse when a variable is unset or blank; blank when the table has none.
fn default_text(var: &EnvVar) -> std::borrow::Cow<'static, str> {
    var.default.value().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::env_table as var;

    fn vars(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn unset_and_blank_take_the_tables_default() {
        for vars in [vars(&[]), vars(&[("PREFECT_WORKER_QUERY_SECONDS", "  ")])] {
            let env = Env::new(&vars);
            assert_eq!(
                env.seconds(&var::PREFECT_WORKER_QUERY_SECONDS),
                Ok(Duration::from_secs(10))
            );
            assert_eq!(env.boolean(&var::DOCKER_WORKER_PREPULL), Ok(false));
            assert_eq!(env.count(&var::DOCKER_WORKER_CRASH_LOG_LINES), Ok(200));
            assert_eq!(
                env.required_duration(None, "--older-than", &var::DOCKER_WORKER_GC_OLDER_THAN),
                Ok(Duration::from_secs(86_400))
            );
            assert_eq!(
                env.duration(None, "--gc-interval", &var::DOCKER_WORKER_GC_INTERVAL),
                Ok(None)
            );
        }
    }

    #[test]
    fn errors_name_the_variable_and_the_value() {
        let vars = vars(&[
            ("PREFECT_WORKER_QUERY_SECONDS", " -1 "),
            ("DOCKER_WORKER_PREPULL", " Maybe "),
            ("DOCKER_WORKER_CRASH_LOG_LINES", " x "),
            ("PREFECT_CLIENT_MAX_RETRIES", " x "),
        ]);
        let env = Env::new(&vars);
        let invalid = |name: &str, value: &str, reason: &str| ConfigError::Invalid {
            name: name.into(),
            value: value.into(),
            reason: reason.into(),
        };
        let secs = "expected a non-negative number of seconds";
        let whole = "expected a whole number";
        assert_eq!(
            env.seconds(&var::PREFECT_WORKER_QUERY_SECONDS),
            Err(invalid("PREFECT_WORKER_QUERY_SECONDS", "-1", secs))
        );
        assert_eq!(
            env.boolean(&var::DOCKER_WORKER_PREPULL),
            Err(invalid(
                "DOCKER_WORKER_PREPULL",
                "maybe",
                "expected true or false"
            ))
        );
        assert_eq!(
            env.count(&var::DOCKER_WORKER_CRASH_LOG_LINES),
            Err(invalid("DOCKER_WORKER_CRASH_LOG_LINES", " x ", whole))
        );
        assert_eq!(
            env.count_trimmed(&var::PREFECT_CLIENT_MAX_RETRIES),
            Err(invalid("PREFECT_CLIENT_MAX_RETRIES", "x", whole))
        );
        let e = env
            .duration(
                Some("soon"),
                "--gc-interval",
                &var::DOCKER_WORKER_GC_INTERVAL,
            )
            .unwrap_err();
        assert!(
            e.to_string()
                .starts_with("invalid value for --gc-interval: \"soon\""),
            "{e}"
        );
    }

    #[test]
    fn seconds_too_large_for_a_duration_are_an_error() {
        let vars = vars(&[("PREFECT_API_REQUEST_TIMEOUT", "1e30")]);
        let e = Env::new(&vars)
            .seconds(&var::PREFECT_API_REQUEST_TIMEOUT)
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid value for PREFECT_API_REQUEST_TIMEOUT: \"1e30\" (expected a non-negative number of seconds)"
        );
    }

    #[test]
    fn reads_are_recorded_and_prefect_settings_skip_internal_ones() {
        let vars = vars(&[
            ("PREFECT_API_URL", "http://x/api"),
            ("PREFECT__FLOW_RUN_ID", "internal"),
            ("OTHER", "y"),
        ]);
        let env = Env::new(&vars);
        let _ = env.non_empty(&var::PREFECT_API_URL);
        let _ = env.boolean(&var::DOCKER_WORKER_CHANNEL);
        assert_eq!(
            env.read(),
            BTreeSet::from(["PREFECT_API_URL", "DOCKER_WORKER_CHANNEL"])
        );
        let settings: Vec<_> = env.prefect_settings().map(|(k, _)| k.as_str()).collect();
        assert_eq!(settings, ["PREFECT_API_URL"]);
    }
}
