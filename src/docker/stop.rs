//! Ending containers: stopping one on a cancellation from Prefect (SIGTERM, then SIGKILL
//! after a grace period) and force-removing one the worker is done with. Stopping the worker
//! never comes here: its containers keep running. Knows bollard's stop and remove calls,
//! nothing of Prefect.

use std::time::Duration;

use bollard::query_parameters::{RemoveContainerOptionsBuilder, StopContainerOptionsBuilder};

use super::connect::DockerRuntime;
use super::create::CreatedContainer;
use super::error::{DockerError, EngineFailure};

impl DockerRuntime {
    /// Stops a container: SIGTERM (or its stop signal), then SIGKILL after `grace`. A container
    /// that is already gone or stopped is not an error.
    ///
    /// # Errors
    /// [`DockerError::Api`] when the Engine refuses.
    pub async fn stop_container(&self, id: &str, grace: Duration) -> Result<(), DockerError> {
        let seconds = i32::try_from(grace.as_secs()).unwrap_or(i32::MAX);
        let options = StopContainerOptionsBuilder::default().t(seconds).build();
        // The stop call itself lasts up to `grace`: give it that on top of the usual timeout.
        let docker = self
            .docker
            .clone()
            .with_timeout(self.docker.timeout() + grace);
        match docker.stop_container(id, Some(options)).await {
            Ok(()) => Ok(()),
            Err(e) => {
                let failure = EngineFailure::from(e);
                if failure.is_not_found() || failure.status == Some(304) {
                    Ok(())
                } else {
                    Err(DockerError::Api {
                        operation: "stop container",
                        failure,
                    })
                }
            }
        }
    }

    /// Force-removes a container (killing it if it runs): for a container that must never run,
    /// such as one of a claim Prefect withdrew. One already gone is not an error.
    ///
    /// # Errors
    /// [`DockerError::Api`] when the Engine refuses.
    pub async fn remove_container(&self, id: &str) -> Result<(), DockerError> {
        let options = RemoveContainerOptionsBuilder::default().force(true).build();
        match self.docker.remove_container(id, Some(options)).await {
            Ok(()) => Ok(()),
            Err(e) => {
                let failure = EngineFailure::from(e);
                if failure.is_not_found() {
                    Ok(())
                } else {
                    Err(DockerError::Api {
                        operation: "remove container",
                        failure,
                    })
                }
            }
        }
    }

    /// Force-removes a container the worker is done with; a failure is only logged, with
    /// `what` saying which container it was.
    pub(super) async fn force_remove(&self, container: &CreatedContainer, what: &str) {
        let options = RemoveContainerOptionsBuilder::default().force(true).build();
        if let Err(e) = self
            .docker
            .remove_container(&container.id, Some(options))
            .await
        {
            tracing::warn!(container = container.display_name(), error = %EngineFailure::from(e), "could not remove the {what}");
        }
    }
}
