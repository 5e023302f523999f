//! Image garbage collection: `docker-worker gc --images`, `start --gc-images` and the
//! `--min-free-disk` guard before pulls. Like [`crate::gc`] it wires both sides: the Docker
//! runtime lists, inspects and removes images and says which containers use them; the Prefect
//! client says which images the deployments use ([`refs`]).
//!
//! An image is removed only when all of these hold, every one decided from what Docker and
//! the API say at that moment (nothing is remembered between collections, so a restart
//! changes nothing):
//! - it carries the `--image-label` when one is given (else every image is looked at);
//! - no container uses it, in any state (running, paused, exited, created, dead);
//! - no deployment of the pools in scope uses it: each deployment's job configuration is
//!   rendered as a run's would be (the pool's template, the deployment's job variables, the
//!   `--job-override`, block and variable references in `image`, the default image when it
//!   names none), and its reference is compared by tag, digest or id;
//! - this process is not pulling it or creating a container from it right now;
//! - no other image is built on it (the Engine would refuse anyway);
//! - it was created or last tagged on this Engine at least `older_than` ago. `Created` is the
//!   image's build time; `Metadata.LastTagTime` is set when it was tagged, built or loaded
//!   here, so a freshly tagged old image counts as young. A pull sets no `LastTagTime`, so
//!   a freshly pulled old image counts as old: the containers made from it, the deployments
//!   using it and the pull in flight protect it instead. "The last time a container of it
//!   was seen" is not kept anywhere by Docker once the container is removed, and keeping it
//!   in memory would not survive a restart, so it is not a criterion.
//!
//! Removal is never forced: the Engine refuses an image a container (even a stopped one)
//! uses, and an image is never removed for being dangling alone.

mod guard;
mod refs;

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};

pub use guard::{DiskGuard, format_bytes, run_periodic};
pub use refs::{PoolScope, Referenced, RefsError, referenced_images};

use crate::docker::{DockerError, DockerRuntime, ImageRemoval, ImageUser, LocalImage};
use crate::job::overrides::JobOverride;
use crate::prefect::PrefectClient;

/// What one image collection looks at.
#[derive(Debug, Clone)]
pub struct ImageGcOptions {
    /// Whose deployments' images are kept.
    pub pools: PoolScope,
    /// Keep images created or last tagged less than this long ago.
    pub older_than: Duration,
    /// Report what would be removed, remove nothing.
    pub dry_run: bool,
    /// Only images carrying this label (`KEY` or `KEY=VALUE`) are looked at.
    pub label: Option<String>,
    /// The image of jobs that name none (`--default-image`), which deployments then use.
    pub default_image: String,
    /// The operator's `--job-override`, which may set the image of every job.
    pub job_override: Option<Arc<JobOverride>>,
}

/// Why an image was kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageKeep {
    /// Containers use it: `name (state)` of up to three, and how many in all.
    InUse {
        /// Some of them, as `'name' (state)`.
        shown: Vec<String>,
        /// How many.
        count: usize,
    },
    /// A deployment uses it.
    Referenced {
        /// Which one (`deployment 'x' of pool 'p'`), and how many more.
        by: String,
    },
    /// This process is pulling it or creating a container from it now.
    InFlight,
    /// Another image is built on it.
    Parent {
        /// That image's name.
        child: String,
    },
    /// Created or tagged less than `older_than` ago.
    TooYoung {
        /// The threshold.
        older_than: Duration,
    },
    /// The Engine gives it no creation time, so its age is unknown.
    NoAge,
    /// Its details could not be read (counts as an error).
    InspectFailed(String),
    /// The Engine refused to remove it (counts as an error).
    RemoveFailed(String),
}

impl ImageKeep {
    /// Whether this keep is the result of a failure (`gc` then exits non-zero).
    pub fn is_error(&self) -> bool {
        matches!(self, Self::InspectFailed(_) | Self::RemoveFailed(_))
    }
}

impl fmt::Display for ImageKeep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::InUse { shown, count } => {
                let more = count.saturating_sub(shown.len());
                let word = if *count == 1 {
                    "container"
                } else {
                    "containers"
                };
                write!(f, "{word} {}", shown.join(", "))?;
                if more > 0 {
                    write!(f, " and {more} more")?;
                }
                f.write_str(if *count == 1 { " uses it" } else { " use it" })
            }
            Self::Referenced { by } => write!(f, "{by} uses it"),
            Self::InFlight => {
                f.write_str("this worker is pulling it or creating a container from it")
            }
            Self::Parent { child } => write!(f, "image {child} is built on it"),
            Self::TooYoung { older_than } => write!(
                f,
                "created or tagged less than {} ago",
                humantime::format_duration(*older_than)
            ),
            Self::NoAge => f.write_str("the Engine has no creation time for it"),
            Self::InspectFailed(e) => write!(f, "could not inspect it: {e}"),
            Self::RemoveFailed(e) => write!(f, "could not remove it: {e}"),
        }
    }
}

/// What happened to one image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageOutcome {
    /// Removed.
    Removed,
    /// Would have been removed (`--dry-run`).
    WouldRemove,
    /// Someone else removed it between the listing and the removal.
    Gone,
    /// Kept, and why.
    Kept(ImageKeep),
}

/// One image and what the collection did with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageDecision {
    /// Its first tag (or digest, or `<none>`).
    pub name: String,
    /// Its id (`sha256:…`).
    pub id: String,
    /// When it was built.
    pub created: Option<DateTime<Utc>>,
    /// When it was last tagged here, when that was read (only for images old enough to ask).
    pub last_tagged: Option<DateTime<Utc>>,
    /// What was done.
    pub outcome: ImageOutcome,
    /// When the collection looked (for "… ago").
    pub checked_at: DateTime<Utc>,
}

impl ImageDecision {
    /// The later of its creation and its last tagging, and which it was: its age.
    fn age_from(&self) -> Option<(&'static str, DateTime<Utc>)> {
        match (self.created, self.last_tagged) {
            (Some(c), Some(t)) if t > c => Some(("tagged", t)),
            (Some(c), _) => Some(("created", c)),
            (None, Some(t)) => Some(("tagged", t)),
            (None, None) => None,
        }
    }
}

impl fmt::Display for ImageDecision {
    /// `removed|would remove|gone|kept <name> <short id> (created|tagged <ago> ago)`, and
    /// `: <reason>` for kept ones.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verb = match self.outcome {
            ImageOutcome::Removed => "removed",
            ImageOutcome::WouldRemove => "would remove",
            ImageOutcome::Gone => "gone",
            ImageOutcome::Kept(_) => "kept",
        };
        let id = self.id.strip_prefix("sha256:").unwrap_or(&self.id);
        let short: String = id.chars().take(12).collect();
        write!(f, "{verb} image {} {short} (", self.name)?;
        match self.age_from() {
            Some((what, at)) => {
                let ago = (self.checked_at - at).to_std().unwrap_or_default();
                write!(f, "{what} {} ago)", rounded(ago))?;
            }
            None => f.write_str("age unknown)")?,
        }
        match &self.outcome {
            ImageOutcome::Kept(reason) => write!(f, ": {reason}"),
            ImageOutcome::Gone => f.write_str(": removed by someone else meanwhile"),
            _ => Ok(()),
        }
    }
}

/// An age for people: seconds under an hour, minutes under a day, whole days beyond (an
/// image may be years old, where hours and humantime's 30.44-day months are noise).
fn rounded(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..3600 => humantime::format_duration(Duration::from_secs(s)).to_string(),
        3600..86400 => humantime::format_duration(Duration::from_secs(s / 60 * 60)).to_string(),
        _ => format!("{}days", s / 86400),
    }
}

/// Everything one image collection decided.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageReport {
    /// One entry per image looked at.
    pub decisions: Vec<ImageDecision>,
    /// Deployments whose image could not be told (they protect no image), one line each.
    pub notes: Vec<String>,
    /// The collection was a dry run.
    pub dry_run: bool,
}

impl ImageReport {
    fn count(&self, pred: impl Fn(&ImageOutcome) -> bool) -> usize {
        self.decisions.iter().filter(|d| pred(&d.outcome)).count()
    }

    /// Images removed.
    pub fn removed(&self) -> usize {
        self.count(|o| *o == ImageOutcome::Removed)
    }

    /// Images a dry run would have removed.
    pub fn would_remove(&self) -> usize {
        self.count(|o| *o == ImageOutcome::WouldRemove)
    }

    /// Images kept.
    pub fn kept(&self) -> usize {
        self.count(|o| matches!(o, ImageOutcome::Kept(_)))
    }

    /// Images kept because something failed.
    pub fn errors(&self) -> usize {
        self.count(|o| matches!(o, ImageOutcome::Kept(r) if r.is_error()))
    }

    /// `gc images: 2 removed, 3 kept, 0 errors` (`gc images (dry run): 2 would remove, …`).
    pub fn summary(&self) -> String {
        let gone = self.count(|o| *o == ImageOutcome::Gone);
        let gone = if gone > 0 {
            format!(", {gone} already gone")
        } else {
            String::new()
        };
        if self.dry_run {
            format!(
                "gc images (dry run): {} would remove, {} kept{gone}, {} errors",
                self.would_remove(),
                self.kept(),
                self.errors()
            )
        } else {
            format!(
                "gc images: {} removed, {} kept{gone}, {} errors",
                self.removed(),
                self.kept(),
                self.errors()
            )
        }
    }
}

/// An image collection that could not even start: nothing was removed.
#[derive(Debug, thiserror::Error)]
pub enum ImageGcError {
    /// The deployments (or the pools, or a block or variable in an image) could not be read,
    /// so which images they use is unknown.
    #[error("could not tell which images the deployments use, so no image was removed: {0}")]
    References(#[source] refs::RefsError),
    /// The Engine could not list its images or containers.
    #[error("could not list images or containers: {0}")]
    ListFailed(#[source] DockerError),
}

/// Whether `image` carries `label` (`KEY` or `KEY=VALUE`).
fn has_label(image: &LocalImage, label: &str) -> bool {
    match label.split_once('=') {
        Some((key, value)) => image.labels.get(key).is_some_and(|v| v == value),
        None => image.labels.contains_key(label),
    }
}

/// Everything a decision needs besides the image itself.
struct Facts<'a> {
    users: &'a HashMap<String, Vec<ImageUser>>,
    referenced: &'a Referenced,
    in_flight: &'a HashSet<String>,
    /// Image id → the (id, name) of the top-level images built on it (directly or through
    /// intermediate build images) that are still there.
    children: HashMap<String, Vec<(String, String)>>,
}

/// The ids of `image`'s ancestors among the listed images, nearest first. Bounded: a cycle
/// in the Engine's answer must not loop for ever.
fn ancestors<'a>(image: &'a LocalImage, by_id: &HashMap<&str, &'a LocalImage>) -> Vec<&'a str> {
    let mut found = Vec::new();
    let mut parent = image.parent_id.as_str();
    while let Some(p) = by_id.get(parent) {
        if found.len() >= by_id.len() || found.contains(&p.id.as_str()) {
            break;
        }
        found.push(p.id.as_str());
        parent = p.parent_id.as_str();
    }
    found
}

/// The images `docker images` shows (without `-a`): tagged or digested ones, and untagged
/// ones no image is built on (dangling). The others are intermediate build images, which go
/// with the last image built on them.
fn top_level(all: &[LocalImage]) -> Vec<&LocalImage> {
    let parents: HashSet<&str> = all.iter().map(|i| i.parent_id.as_str()).collect();
    all.iter()
        .filter(|i| {
            !i.repo_tags.is_empty()
                || !i.repo_digests.is_empty()
                || !parents.contains(i.id.as_str())
        })
        .collect()
}

/// The part of a decision that needs no age: containers, deployments, pulls, children.
fn keep_before_age(image: &LocalImage, facts: &Facts<'_>) -> Option<ImageKeep> {
    if let Some(users) = facts.users.get(&image.id).filter(|u| !u.is_empty()) {
        return Some(ImageKeep::InUse {
            shown: users
                .iter()
                .take(3)
                .map(|u| format!("'{}' ({})", u.name, u.state))
                .collect(),
            count: users.len(),
        });
    }
    if let Some(by) = facts.referenced.user_of(image) {
        return Some(ImageKeep::Referenced { by });
    }
    let names = image.repo_tags.iter().chain(&image.repo_digests);
    if names
        .map(|n| refs::canonical(n))
        .any(|n| facts.in_flight.contains(&n))
    {
        return Some(ImageKeep::InFlight);
    }
    if let Some((_, child)) = facts.children.get(&image.id).and_then(|c| c.first()) {
        return Some(ImageKeep::Parent {
            child: child.clone(),
        });
    }
    None
}

/// The age part: `None` = old enough to go.
fn keep_for_age(
    created: Option<DateTime<Utc>>,
    last_tagged: Option<DateTime<Utc>>,
    older_than: Duration,
    now: DateTime<Utc>,
) -> Option<ImageKeep> {
    let Some(since) = created.into_iter().chain(last_tagged).max() else {
        return Some(ImageKeep::NoAge);
    };
    // A time in the future (clock skew) is age zero.
    let age = (now - since).to_std().unwrap_or_default();
    (age < older_than).then_some(ImageKeep::TooYoung { older_than })
}

/// The decision about one candidate, carried out.
async fn decide(
    docker: &DockerRuntime,
    options: &ImageGcOptions,
    image: &LocalImage,
    facts: &Facts<'_>,
) -> ImageDecision {
    let now = Utc::now();
    let mut decision = ImageDecision {
        name: image.display_name().to_owned(),
        id: image.id.clone(),
        created: image.created,
        last_tagged: None,
        outcome: ImageOutcome::WouldRemove,
        checked_at: now,
    };
    if let Some(keep) = keep_before_age(image, facts) {
        decision.outcome = ImageOutcome::Kept(keep);
        return decision;
    }
    match docker.image_last_tagged(&image.id).await {
        Ok(tagged) => decision.last_tagged = tagged,
        Err(e) => {
            decision.outcome = ImageOutcome::Kept(ImageKeep::InspectFailed(e.to_string()));
            return decision;
        }
    }
    if let Some(keep) = keep_for_age(image.created, decision.last_tagged, options.older_than, now) {
        decision.outcome = ImageOutcome::Kept(keep);
    } else if !options.dry_run {
        decision.outcome = match docker.remove_image(image).await {
            Ok(ImageRemoval::Removed) => ImageOutcome::Removed,
            Ok(ImageRemoval::AlreadyGone) => ImageOutcome::Gone,
            // Build cache no listed image leads to: the Engine keeps the parent for it, and
            // that is no failure of the collection.
            Err(e) if e.to_string().contains("dependent child images") => {
                ImageOutcome::Kept(ImageKeep::Parent {
                    child: "an untagged build image".into(),
                })
            }
            Err(e) => ImageOutcome::Kept(ImageKeep::RemoveFailed(e.to_string())),
        };
    }
    decision
}

/// Runs one image collection.
///
/// Per-image failures are kept and reported in the [`ImageReport`], never returned.
///
/// # Errors
/// [`ImageGcError`] when it cannot start: the deployments' images cannot be told (nothing is
/// removed then), or the Engine cannot list its images or containers.
pub async fn collect(
    docker: &DockerRuntime,
    api: &PrefectClient,
    options: &ImageGcOptions,
) -> Result<ImageReport, ImageGcError> {
    let referenced = referenced_images(api, options)
        .await
        .map_err(ImageGcError::References)?;
    // Containers first, images second: an image listed after its container is protected by
    // it; a container created after the listing protects its image through the Engine.
    let users = docker
        .image_users()
        .await
        .map_err(ImageGcError::ListFailed)?;
    let images = docker
        .list_images()
        .await
        .map_err(ImageGcError::ListFailed)?;
    let in_flight: HashSet<String> = docker
        .images_in_flight()
        .iter()
        .map(|i| refs::canonical(i))
        .collect();
    let by_id: HashMap<&str, &LocalImage> = images.iter().map(|i| (i.id.as_str(), i)).collect();
    let top = top_level(&images);
    let mut children: HashMap<String, Vec<(String, String)>> = HashMap::new();
    let mut lineage: HashMap<&str, Vec<&str>> = HashMap::new();
    for image in &top {
        let up = ancestors(image, &by_id);
        for ancestor in &up {
            children
                .entry((*ancestor).to_owned())
                .or_default()
                .push((image.id.clone(), image.display_name().to_owned()));
        }
        lineage.insert(image.id.as_str(), up);
    }
    let mut candidates: Vec<&LocalImage> = top
        .into_iter()
        .filter(|i| options.label.as_deref().is_none_or(|l| has_label(i, l)))
        .collect();
    // Children before their parents, so a chain of unused images goes in one collection.
    candidates.sort_by_key(|i| std::cmp::Reverse(lineage.get(i.id.as_str()).map_or(0, Vec::len)));
    let mut facts = Facts {
        users: &users,
        referenced: &referenced,
        in_flight: &in_flight,
        children,
    };
    let mut report = ImageReport {
        decisions: Vec::with_capacity(candidates.len()),
        notes: referenced.notes.clone(),
        dry_run: options.dry_run,
    };
    for image in candidates {
        let decision = decide(docker, options, image, &facts).await;
        // A child that went (or would go) no longer holds its ancestors back.
        if matches!(
            decision.outcome,
            ImageOutcome::Removed | ImageOutcome::WouldRemove | ImageOutcome::Gone
        ) {
            for ancestor in lineage.get(image.id.as_str()).into_iter().flatten() {
                if let Some(rest) = facts.children.get_mut(*ancestor) {
                    rest.retain(|(id, _)| *id != image.id);
                    if rest.is_empty() {
                        facts.children.remove(*ancestor);
                    }
                }
            }
        }
        report.decisions.push(decision);
    }
    Ok(report)
}

#[cfg(test)]
mod tests;
