//! HMAC-SHA256 signing and constant-time verification of Jupyter messages.
//! (skeleton; the wire-client work fills it in)
