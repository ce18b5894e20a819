//! The local backend: a kernel as a plain child process in its own process group.
