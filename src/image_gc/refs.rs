//! Which images the deployments use: each deployment of the pools in scope rendered as a
//! run of it would be (and as `--prepull` renders it), with the same functions of
//! [`crate::job`]: the pool's base job template, the deployment's job variables, the
//! operator's `--job-override`, block and variable references in `image`, and the default
//! image when the configuration names none. Flow runs of those pools that are not over yet
//! and set their own job variables are rendered too, so a run waiting with its own `image`
//! finds it. Everything is read from the API at every collection.

use std::collections::{BTreeMap, HashMap};

use serde_json::{Map, Value};

use super::ImageGcOptions;
use crate::docker::LocalImage;
use crate::job::overrides::apply_override;
use crate::job::refs::{Fetched, References, resolve};
use crate::job::render::{deployment_job_variables, merge_job_variables, render_job_configuration};
use crate::prefect::{ApiError, Deployment, FlowRun, PrefectClient, WorkPool};

/// Whose deployments' images are kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PoolScope {
    /// One pool's (`gc --images --pool P`).
    One(String),
    /// Every pool's of the server: a Docker host may serve several pools' workers.
    All,
}

/// The flow-run states whose runs may still start a container.
const LIVE_STATES: [&str; 5] = ["SCHEDULED", "PENDING", "RUNNING", "PAUSED", "CANCELLING"];

/// The images the deployments (and waiting runs) use, by canonical name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Referenced {
    /// Canonical name (`docker.io/library/busybox:latest`, `reg:5000/app@sha256:…`) → who
    /// uses it, first one first.
    names: HashMap<String, Vec<String>>,
    /// References that may be image ids (`sha256:…` or twelve or more hex digits) → who.
    ids: Vec<(String, String)>,
    /// Deployments whose image could not be told, one line each.
    pub notes: Vec<String>,
}

/// The full name of an image reference, as the Engine resolves it: registry, repository,
/// and tag (`:latest` when none) or digest.
pub fn canonical(reference: &str) -> String {
    let [_, full] = crate::guard::image::image_names(reference);
    full
}

/// `sha256:…` or a bare hex string of twelve or more digits: possibly an image id.
fn id_like(reference: &str) -> Option<&str> {
    let hex = reference.strip_prefix("sha256:").unwrap_or(reference);
    (hex.len() >= 12 && hex.bytes().all(|b| b.is_ascii_hexdigit())).then_some(hex)
}

impl Referenced {
    /// Records that `by` uses `image`. A reference with both a tag and a digest is recorded
    /// by its digest as well, which is how the Engine lists a pulled image.
    pub fn add(&mut self, image: &str, by: String) {
        let image = image.trim();
        if image.is_empty() {
            return;
        }
        if let Some(hex) = id_like(image) {
            self.ids.push((hex.to_owned(), by.clone()));
        }
        let mut names = vec![canonical(image)];
        if let Some((name, digest)) = image.split_once('@') {
            let last_slash = name.rfind('/').map_or(0, |i| i + 1);
            let untagged = match name[last_slash..].rfind(':') {
                Some(colon) => &name[..last_slash + colon],
                None => name,
            };
            names.push(canonical(&format!("{untagged}@{digest}")));
        }
        for name in names {
            let users = self.names.entry(name).or_default();
            if !users.contains(&by) {
                users.push(by.clone());
            }
        }
    }

    /// Who uses `image` (by one of its tags or digests, or its id), as
    /// `deployment 'x' of pool 'p'` with how many more; `None` when nobody does.
    pub fn user_of(&self, image: &LocalImage) -> Option<String> {
        let id = image.id.strip_prefix("sha256:").unwrap_or(&image.id);
        let mut users: Vec<&String> = image
            .repo_tags
            .iter()
            .chain(&image.repo_digests)
            .filter_map(|n| self.names.get(&canonical(n)))
            .flatten()
            .chain(
                self.ids
                    .iter()
                    .filter(|(hex, _)| id.starts_with(hex.as_str()))
                    .map(|(_, by)| by),
            )
            .collect();
        users.dedup();
        let first = users.first()?;
        Some(match users.len() {
            1 => (*first).clone(),
            n => format!("{first} (and {} more)", n - 1),
        })
    }

    /// How many distinct references were recorded.
    pub fn len(&self) -> usize {
        self.names.len() + self.ids.len()
    }

    /// Whether none was.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Why the deployments' images could not be told.
#[derive(Debug, thiserror::Error)]
pub enum RefsError {
    /// An API call failed.
    #[error(transparent)]
    Api(#[from] ApiError),
    /// `--pool` names no pool: collecting would protect nothing, which a typo must not do.
    #[error("work pool '{0}' does not exist")]
    PoolNotFound(String),
}

/// The images the deployments of `options.pools`, and their runs that are not over yet, use.
///
/// # Errors
/// [`RefsError`] when the pools, their deployments or runs, or a block or variable in an
/// image cannot be read: without them nothing can be removed safely.
pub async fn referenced_images(
    api: &PrefectClient,
    options: &ImageGcOptions,
) -> Result<Referenced, RefsError> {
    let pools: Vec<WorkPool> = match &options.pools {
        PoolScope::One(name) => vec![
            api.read_work_pool(name)
                .await?
                .ok_or_else(|| RefsError::PoolNotFound(name.clone()))?,
        ],
        PoolScope::All => api.read_work_pools().await?,
    };
    let mut referenced = Referenced::default();
    for pool in &pools {
        let deployments = api.pool_deployments(&pool.name).await?;
        for deployment in &deployments {
            let by = format!("deployment '{}' of pool '{}'", deployment.name, pool.name);
            note_or_add(
                api,
                options,
                pool,
                Some(deployment),
                None,
                by,
                &mut referenced,
            )
            .await?;
        }
        let by_id: BTreeMap<&str, &Deployment> =
            deployments.iter().map(|d| (d.id.as_str(), d)).collect();
        let runs = api.read_pool_flow_runs(&pool.name, &LIVE_STATES).await?;
        for run in runs.iter().filter(|r| !r.job_variables.is_empty()) {
            let deployment = run
                .deployment_id
                .as_deref()
                .and_then(|id| by_id.get(id).copied());
            let by = format!("flow run '{}' of pool '{}'", run.name, pool.name);
            note_or_add(
                api,
                options,
                pool,
                deployment,
                Some(run),
                by,
                &mut referenced,
            )
            .await?;
        }
    }
    Ok(referenced)
}

/// Records the image of one deployment (or run), or a note saying why it has none.
async fn note_or_add(
    api: &PrefectClient,
    options: &ImageGcOptions,
    pool: &WorkPool,
    deployment: Option<&Deployment>,
    flow_run: Option<&FlowRun>,
    by: String,
    referenced: &mut Referenced,
) -> Result<(), RefsError> {
    match configured_image(api, options, pool, deployment, flow_run).await? {
        Ok(Some(image)) => referenced.add(&image, by),
        Ok(None) => {}
        Err(why) => referenced.notes.push(format!(
            "{by}: its image could not be told ({why}); it keeps no image"
        )),
    }
    Ok(())
}

/// The image a run of `deployment` (with `flow_run`'s own job variables) would use:
/// `Ok(Some)`, `Ok(None)` when the configuration's `image` is not a string (its runs fail
/// validation and use no image), or `Err` with why it cannot be told (its runs fail too).
///
/// # Errors
/// The outer error when the API could not be read (a transient failure, not the job's).
async fn configured_image(
    api: &PrefectClient,
    options: &ImageGcOptions,
    pool: &WorkPool,
    deployment: Option<&Deployment>,
    flow_run: Option<&FlowRun>,
) -> Result<Result<Option<String>, String>, ApiError> {
    let image = match image_value(&pool.base_job_template, deployment, flow_run, options) {
        Ok(Some(image)) => image,
        Ok(None) => return Ok(Ok(Some(options.default_image.clone()))),
        Err(why) => return Ok(Err(why)),
    };
    let refs = References::collect(&image);
    let image = if refs.is_empty() {
        image
    } else {
        let fetched = fetch(api, &refs).await?;
        match resolve(&image, &fetched) {
            Ok(image) => image,
            Err(e) => return Ok(Err(e.to_string())),
        }
    };
    Ok(Ok(image.as_str().map(str::to_owned)))
}

/// The `image` of the job configuration a run would get, before its references are
/// resolved; `Ok(None)` when it names none (the default image then). Pure: the same
/// rendering as a run's (`resolve_configuration`) and `--prepull`'s.
///
/// # Errors
/// The template's error when it cannot be rendered (its runs crash: they use no image); a
/// pool with no template at all is rendered with the default one, as a worker fills it in.
pub(super) fn image_value(
    template: &Value,
    deployment: Option<&Deployment>,
    flow_run: Option<&FlowRun>,
    options: &ImageGcOptions,
) -> Result<Option<Value>, String> {
    let variables = merge_job_variables(
        deployment.and_then(|d| deployment_job_variables(&d.raw)),
        flow_run.map(|r| &r.job_variables),
    );
    // A pool created without a template gets the default one from the first worker that
    // syncs it (as `sync` does); until then, and for `gc`, that default stands in for it.
    let default_template;
    let template = if template
        .get("job_configuration")
        .is_some_and(Value::is_object)
    {
        template
    } else {
        default_template = crate::job::default_base_job_template();
        &default_template
    };
    // `{{ $NAME }}` placeholders read the worker's environment, as a run's do.
    let env = |name: &str| std::env::var(name).ok();
    let rendered: Map<String, Value> =
        render_job_configuration(template, &variables, &env).map_err(|e| e.to_string())?;
    let rendered = apply_override(rendered, options.job_override.as_deref());
    Ok(rendered.get("image").cloned())
}

/// The blocks and variables `refs` names (a missing one is left out, as for a run).
async fn fetch(api: &PrefectClient, refs: &References) -> Result<Fetched, ApiError> {
    let mut fetched = Fetched::default();
    for id in &refs.block_ids {
        if let Some(data) = api.read_block_document(id).await? {
            fetched.blocks_by_id.insert(id.clone(), data);
        }
    }
    for (slug, name) in &refs.block_names {
        if let Some(data) = api.read_block_document_by_name(slug, name).await? {
            fetched
                .blocks_by_name
                .insert((slug.clone(), name.clone()), data);
        }
    }
    for name in &refs.variables {
        let value = api.read_variable(name).await?;
        fetched.variables.insert(name.clone(), value);
    }
    Ok(fetched)
}
