//! Server configuration shared by the CLI and tests.
