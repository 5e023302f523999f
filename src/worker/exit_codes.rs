//! What a container's exit code means, in the words Prefect 3.9 shows users.

/// Explanation and suggested resolution for an exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitCodeInfo {
    /// What happened.
    pub explanation: &'static str,
    /// What to do about it.
    pub resolution: &'static str,
}

/// Looks up `code` in Prefect's table; unknown codes get the generic entry.
pub fn explain(code: i64) -> ExitCodeInfo {
    let (explanation, resolution) = match code {
        1 => (
            "Process exited with a general error.",
            "Check the flow run logs for an unhandled exception or assertion error.",
        ),
        125 => (
            "Container failed to run (Docker/OCI exit code 125).",
            "Verify the container image exists, the entrypoint is correct, and the container runtime is healthy.",
        ),
        126 => (
            "Command found but not executable (permission denied).",
            "Check file permissions on the entrypoint script or binary. Ensure the file has the executable bit set.",
        ),
        127 => (
            "Command not found.",
            "Verify that the entrypoint command or script is installed in the execution environment. Check your PATH and container image contents.",
        ),
        137 => (
            "Process was killed, likely due to an out-of-memory (OOM) condition.",
            "Increase the memory allocation for the flow run infrastructure. In Kubernetes, raise the memory limit in the job template. In ECS, increase the task memory.",
        ),
        143 => (
            "Process received SIGTERM via the container runtime. This is the containerized equivalent of exit code -15.",
            "If this was caused by cancellation or a scaling event, no action is needed. Otherwise, check for pod evictions or ECS task stops.",
        ),
        247 => (
            "Process was terminated due to high memory usage.",
            "Increase the memory allocation for the flow run infrastructure. Consider profiling memory usage to find the source of consumption.",
        ),
        -9 => (
            "Process exited due to a SIGKILL signal. Typically caused by the operating system terminating the process for exceeding memory limits, or by manual cancellation.",
            "Check whether the flow run exceeded its memory allocation. If running in a container, increase the memory limit. If this was intentional cancellation, no action is needed.",
        ),
        -15 => (
            "Process exited due to a SIGTERM signal. Typically caused by graceful shutdown or manual cancellation.",
            "If this was caused by cancellation, no action is needed. Otherwise, check for infrastructure scaling events or deployment rollovers.",
        ),
        3_221_225_786 => (
            "Process was terminated due to a Ctrl+C or Ctrl+Break signal. Typically caused by manual cancellation.",
            "If this was intentional cancellation, no action is needed.",
        ),
        _ => (
            "Process exited with an unexpected status code.",
            "Check the flow run logs and infrastructure logs for more details.",
        ),
    };
    ExitCodeInfo {
        explanation,
        resolution,
    }
}

/// The Crashed state message for a non-zero exit.
pub fn crash_message(code: i64) -> String {
    format!(
        "Flow run infrastructure exited with non-zero status code {code}. {}",
        explain(code).explanation
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages() {
        assert_eq!(
            crash_message(3),
            "Flow run infrastructure exited with non-zero status code 3. Process exited with an unexpected status code."
        );
        assert!(crash_message(137).contains("out-of-memory"));
        assert_eq!(
            explain(1).resolution,
            "Check the flow run logs for an unhandled exception or assertion error."
        );
    }
}
