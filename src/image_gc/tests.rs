//! The decisions of an image collection, without an Engine or a server.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::json;

use super::refs::{canonical, image_value};
use super::*;
use crate::docker::ImageUser;
use crate::job::overrides::JobOverride;
use crate::prefect::{Deployment, FlowRun};

fn image(id: &str, tags: &[&str], digests: &[&str]) -> LocalImage {
    LocalImage {
        id: format!("sha256:{id}"),
        parent_id: String::new(),
        repo_tags: tags.iter().map(|t| (*t).to_owned()).collect(),
        repo_digests: digests.iter().map(|d| (*d).to_owned()).collect(),
        created: None,
        size: 1,
        labels: HashMap::new(),
    }
}

fn options(job_override: Option<JobOverride>) -> ImageGcOptions {
    ImageGcOptions {
        pools: PoolScope::All,
        older_than: Duration::from_secs(7 * 86_400),
        dry_run: false,
        label: None,
        default_image: "prefecthq/prefect:3.9.1-python3.11".into(),
        job_override: job_override.map(Arc::new),
    }
}

#[test]
fn references_match_by_canonical_name_digest_and_id() {
    assert_eq!(canonical("busybox"), "docker.io/library/busybox:latest");
    assert_eq!(
        canonical("docker.io/library/busybox:latest"),
        "docker.io/library/busybox:latest"
    );
    assert_eq!(canonical("localhost:5000/a/b"), "localhost:5000/a/b:latest");
    let mut r = Referenced::default();
    r.add("busybox", "deployment 'a' of pool 'p'".into());
    r.add("busybox:latest", "deployment 'b' of pool 'p'".into());
    r.add(
        "reg:5000/app:1@sha256:abc",
        "deployment 'c' of pool 'p'".into(),
    );
    r.add("0123456789abcdef", "deployment 'd' of pool 'p'".into());
    r.add("  ", "deployment 'e' of pool 'p'".into());
    assert_eq!(
        r.user_of(&image("ffff", &["docker.io/library/busybox:latest"], &[])),
        Some("deployment 'a' of pool 'p' (and 1 more)".into())
    );
    // A pulled image is listed by its digest.
    assert_eq!(
        r.user_of(&image("eeee", &[], &["reg:5000/app@sha256:abc"])),
        Some("deployment 'c' of pool 'p'".into())
    );
    assert_eq!(
        r.user_of(&image("0123456789abcdef99", &[], &[])),
        Some("deployment 'd' of pool 'p'".into())
    );
    assert_eq!(
        r.user_of(&image("dddd", &["busybox:1.36"], &["busybox@sha256:x"])),
        None
    );
    assert_eq!(r.user_of(&image("dddd", &[], &[])), None);
}

fn facts<'a>(
    users: &'a HashMap<String, Vec<ImageUser>>,
    referenced: &'a Referenced,
    in_flight: &'a HashSet<String>,
) -> Facts<'a> {
    Facts {
        users,
        referenced,
        in_flight,
        children: HashMap::new(),
    }
}

/// Each protection alone keeps an image; in the order containers, deployments, pulls in
/// flight, children.
#[test]
fn in_use_referenced_in_flight_and_parents_are_kept() {
    let orphan = image("aaaa", &["local/orphan:1"], &[]);
    let mut users = HashMap::new();
    let mut referenced = Referenced::default();
    let mut in_flight = HashSet::new();
    assert_eq!(
        keep_before_age(&orphan, &facts(&users, &referenced, &in_flight)),
        None
    );

    let mut with_child = facts(&users, &referenced, &in_flight);
    with_child.children.insert(
        orphan.id.clone(),
        vec![("sha256:bbbb".into(), "local/child:1".into())],
    );
    assert_eq!(
        keep_before_age(&orphan, &with_child),
        Some(ImageKeep::Parent {
            child: "local/child:1".into()
        })
    );

    in_flight.insert(canonical("local/orphan:1"));
    assert_eq!(
        keep_before_age(&orphan, &facts(&users, &referenced, &in_flight)),
        Some(ImageKeep::InFlight)
    );

    referenced.add("local/orphan:1", "deployment 'd' of pool 'p'".into());
    assert_eq!(
        keep_before_age(&orphan, &facts(&users, &referenced, &in_flight)),
        Some(ImageKeep::Referenced {
            by: "deployment 'd' of pool 'p'".into()
        })
    );

    let stopped = |name: &str, state: &str| ImageUser {
        name: name.into(),
        state: state.into(),
    };
    users.insert(
        orphan.id.clone(),
        vec![
            stopped("a", "exited"),
            stopped("b", "running"),
            stopped("c", "created"),
            stopped("d", "dead"),
        ],
    );
    let keep = keep_before_age(&orphan, &facts(&users, &referenced, &in_flight)).unwrap();
    assert_eq!(
        keep.to_string(),
        "containers 'a' (exited), 'b' (running), 'c' (created) and 1 more use it"
    );
    users.insert(orphan.id.clone(), vec![stopped("a", "exited")]);
    let keep = keep_before_age(&orphan, &facts(&users, &referenced, &in_flight)).unwrap();
    assert_eq!(keep.to_string(), "container 'a' (exited) uses it");
}

#[test]
fn age_is_the_later_of_creation_and_last_tagging() {
    let now = Utc::now();
    let week = Duration::from_secs(7 * 86_400);
    let days = |n: i64| Some(now - chrono::Duration::days(n));
    assert_eq!(keep_for_age(days(30), None, week, now), None);
    assert_eq!(
        keep_for_age(days(30), days(1), week, now),
        Some(ImageKeep::TooYoung { older_than: week })
    );
    assert_eq!(
        keep_for_age(days(1), days(30), week, now),
        Some(ImageKeep::TooYoung { older_than: week })
    );
    assert_eq!(keep_for_age(None, days(8), week, now), None);
    assert_eq!(keep_for_age(None, None, week, now), Some(ImageKeep::NoAge));
    // Clock skew: a time in the future is age zero.
    assert_eq!(
        keep_for_age(
            Some(now + chrono::Duration::hours(1)),
            None,
            Duration::ZERO,
            now
        ),
        None
    );
}

#[test]
fn ancestors_and_top_level_images() {
    let mut base = image("aaaa", &["base:1"], &[]);
    base.parent_id = "sha256:not-listed".into();
    let mut mid = image("bbbb", &[], &[]);
    mid.parent_id = base.id.clone();
    let mut leaf = image("cccc", &["leaf:1"], &[]);
    leaf.parent_id = mid.id.clone();
    let dangling = image("eeee", &[], &[]);
    let mut cycle = image("dddd", &["c:1"], &[]);
    cycle.parent_id = cycle.id.clone();
    let all = [
        base.clone(),
        mid.clone(),
        leaf.clone(),
        dangling.clone(),
        cycle.clone(),
    ];
    let by_id: HashMap<&str, &LocalImage> = all.iter().map(|i| (i.id.as_str(), i)).collect();
    assert!(ancestors(&base, &by_id).is_empty());
    assert_eq!(
        ancestors(&leaf, &by_id),
        [mid.id.as_str(), base.id.as_str()]
    );
    assert_eq!(ancestors(&cycle, &by_id), [cycle.id.as_str()]);
    // The intermediate build image is not top-level; a dangling image is.
    let top: Vec<&str> = top_level(&all).iter().map(|i| i.id.as_str()).collect();
    assert_eq!(
        top,
        [
            base.id.as_str(),
            leaf.id.as_str(),
            dangling.id.as_str(),
            cycle.id.as_str()
        ]
    );
}

#[test]
fn labels_select_candidates() {
    let mut i = image("aaaa", &[], &[]);
    i.labels
        .insert("dev.docker-worker.test".into(), "t1".into());
    assert!(has_label(&i, "dev.docker-worker.test"));
    assert!(has_label(&i, "dev.docker-worker.test=t1"));
    assert!(!has_label(&i, "dev.docker-worker.test=t2"));
    assert!(!has_label(&i, "other"));
}

#[test]
fn lines_and_summary() {
    let now: DateTime<Utc> = Utc::now();
    let mut d = ImageDecision {
        name: "local/app:1".into(),
        id: "sha256:0123456789abcdef0123".into(),
        created: Some(now - chrono::Duration::days(9) - chrono::Duration::minutes(3)),
        last_tagged: None,
        outcome: ImageOutcome::Removed,
        checked_at: now,
    };
    assert_eq!(
        d.to_string(),
        "removed image local/app:1 0123456789ab (created 9days ago)"
    );
    d.created = Some(now - chrono::Duration::days(2530) - chrono::Duration::hours(13));
    assert_eq!(
        d.to_string(),
        "removed image local/app:1 0123456789ab (created 2530days ago)"
    );
    d.last_tagged = Some(now - chrono::Duration::hours(2));
    d.outcome = ImageOutcome::Kept(ImageKeep::TooYoung {
        older_than: Duration::from_secs(7 * 86_400),
    });
    assert_eq!(
        d.to_string(),
        "kept image local/app:1 0123456789ab (tagged 2h ago): created or tagged less than 7days ago"
    );
    d.created = None;
    d.last_tagged = None;
    d.outcome = ImageOutcome::WouldRemove;
    assert_eq!(
        d.to_string(),
        "would remove image local/app:1 0123456789ab (age unknown)"
    );
    let mut report = ImageReport {
        decisions: vec![d.clone()],
        notes: vec![],
        dry_run: true,
    };
    d.outcome = ImageOutcome::Kept(ImageKeep::RemoveFailed("conflict".into()));
    report.decisions.push(d.clone());
    d.outcome = ImageOutcome::Gone;
    report.decisions.push(d);
    assert_eq!(
        report.summary(),
        "gc images (dry run): 1 would remove, 1 kept, 1 already gone, 1 errors"
    );
    report.dry_run = false;
    assert_eq!(
        report.summary(),
        "gc images: 0 removed, 1 kept, 1 already gone, 1 errors"
    );
}

/// The image a deployment keeps is the one its runs would use: the template's default, the
/// deployment's, a run's own, and the operator's override last; the default image when the
/// configuration names none; `{{ $NAME }}` from the worker's environment.
#[test]
fn the_image_is_rendered_as_a_runs() {
    let template = crate::job::default_base_job_template();
    let deployment = |vars: serde_json::Value| {
        Deployment::from_value(json!({"id": "d1", "name": "dep", "job_variables": vars})).unwrap()
    };
    let run = |vars: serde_json::Value| {
        FlowRun::from_value(
            json!({"id": "r1", "name": "run", "flow_id": "f", "job_variables": vars}),
        )
        .unwrap()
    };
    let none = options(None);
    assert_eq!(image_value(&template, None, None, &none), Ok(None));
    let dep = deployment(json!({"image": "local/dep:1"}));
    assert_eq!(
        image_value(&template, Some(&dep), None, &none),
        Ok(Some(json!("local/dep:1")))
    );
    let own = run(json!({"image": "local/run:1"}));
    assert_eq!(
        image_value(&template, Some(&dep), Some(&own), &none),
        Ok(Some(json!("local/run:1")))
    );
    let over = JobOverride::parse(
        Path::new("o.json"),
        r#"{"image": "local/host:1"}"#,
        Path::new("/"),
    )
    .unwrap();
    assert_eq!(
        image_value(&template, Some(&dep), Some(&own), &options(Some(over))),
        Ok(Some(json!("local/host:1")))
    );
    // `{{ $NAME }}` in a template reads the worker's environment.
    let path = std::env::var("PATH").unwrap_or_default();
    let env_template = json!({"job_configuration": {"image": "x/{{ $PATH }}"}, "variables": {}});
    assert_eq!(
        image_value(&env_template, Some(&dep), None, &none),
        Ok(Some(json!(format!("x/{path}"))))
    );
    // A pool created without a template: the default one, as the worker's sync fills it in.
    assert_eq!(
        image_value(&json!({}), Some(&dep), None, &none),
        Ok(Some(json!("local/dep:1")))
    );
    assert_eq!(image_value(&json!({}), None, None, &none), Ok(None));
}
