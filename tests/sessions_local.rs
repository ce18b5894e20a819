//! Session behaviours against the local backend (a real ipykernel process per session).

mod behaviour;
mod common;

behaviours!(common::TestServer::local();
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
