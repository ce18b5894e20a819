//! The Docker backend (bollard): one hardened container per session, talking to the server over
//! ipc sockets in a bind-mounted per-session directory. (skeleton; the Docker work fills it in)
