//! Session behaviours against the Docker backend (a hardened container per session, real image).
//! Needs the kernel image: `kernel-image/build.sh`.

mod behaviour;
mod common;

use std::sync::Arc;

use kernelbox::sandbox::docker::{DockerConfig, DockerSandbox};
use kernelbox::session::SessionOptions;

/// A server on the Docker backend with its own state dir (so its own instance id); stopping it
/// shuts every session down and cleans up the instance's containers.
async fn docker_server() -> common::TestServer {
    let sandbox = DockerSandbox::new(DockerConfig {
        state_dir: common::temp_state_dir(),
        ..DockerConfig::default()
    })
    .await
    .unwrap_or_else(|err| panic!("{err} (build the image: kernel-image/build.sh)"));
    common::TestServer::start(Arc::new(sandbox), SessionOptions::default()).await
}

behaviours!(docker_server();
    variables_persist,
    stdout_and_stderr_keep_their_order,
    matplotlib_png_arrives,
    errors_are_reported_and_the_session_survives,
    input_round_trip,
    interrupt_stops_a_long_cell_and_keeps_state,
    restart_clears_state,
    sessions_are_isolated,
    bad_frames_get_errors_and_nothing_breaks,
    a_disconnecting_client_does_not_stop_the_cell,
    cells_run_in_submission_order,
    completion_and_inspection,
    cell_timeout_interrupts,
);
